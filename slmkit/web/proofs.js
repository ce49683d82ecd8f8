// The miniature proofs (/api/proofs): for each seed system, the commands that measure its effect, and, once they
// have run here, the claims read from the result file beside the figures committed in docs/results/.
"use strict";

const VERDICTS = { true: ["holds", "finished"], false: ["does not hold", "failed"] };

function verdict(c) {
  const [text, style] = VERDICTS[c.holds] ||
    [c.difference_interval ? "not distinguishable" : "no interval yet", "interrupted"];
  return el("span", { className: `state ${style}`, textContent: text });
}

function figures(c) {
  const arms = Object.entries(c.arms).map(([name, value]) => `${name} ${number(value)}`).join(" vs ");
  const i = c.difference_interval;
  return i ? `${arms}; difference [${number(i[0])}, ${number(i[1])}]` : arms;
}

function claimRows(claims, reference) {
  return claims.map((c) => {
    const ref = reference.find((r) => r.claim === c.claim);
    return el("tr", { className: "claim" }, el("td", { textContent: c.claim }),
      el("td", { className: "figures", textContent: figures(c) }), el("td", {}, verdict(c)),
      el("td", { textContent: c.over || "" }),
      el("td", {}, ...(ref ? [figures(ref), " ", verdict(ref)] : ["–"])));
  });
}

function card(p) {
  const head = el("div", { className: "row" }, el("h3", { textContent: p.system }),
    el("span", { className: "muted", textContent: p.effect }));
  const box = el("section", { className: "proof", dataset: { key: p.key } }, head);
  box.append(el("div", {}, el("span", { className: "muted", textContent: "Commands " }),
    ...p.commands.map((c) => el("code", { textContent: c })), el("span", { className: "muted",
      textContent: ` · ${p.doc}` })));
  if (p.error) box.append(el("p", { className: "error", textContent: p.error }));
  if (p.measured) {
    box.append(el("p", {}, `Measured here ${ago(p.measured)}: `,
      el("a", { href: `/runs#run=${encodeURIComponent(p.run)}`, textContent: `run ${p.run}` })));
  } else {
    box.append(el("p", { className: "muted", textContent: `Not run on this machine (no ${p.result} yet).` }));
  }
  const reference = p.reference || [];
  const shown = p.claims.length ? p.claims : reference;
  if (shown.length) {
    const table = el("table", {}, el("tr", {}, ...["claim", p.claims.length ? "measured here" : "committed",
      "verdict", "over", "committed (docs/results)"].map((h) => el("th", { textContent: h }))));
    table.append(...claimRows(shown, p.claims.length ? reference : []));
    box.append(table);
  }
  return box;
}

async function show() {
  try {
    const proofs = await api("/api/proofs");
    const measured = proofs.filter((p) => p.measured).length;
    const holding = proofs.filter((p) => p.claims.length && p.claims.every((c) => c.holds === true)).length;
    $("summary").textContent = `${measured} of ${proofs.length} measured on this machine; ${holding} with every ` +
      "claim holding.";
    $("proofs").replaceChildren(...proofs.map(card));
    status("");
  } catch (e) {
    status(e.message);
  }
}

show();
setInterval(show, 10000);
