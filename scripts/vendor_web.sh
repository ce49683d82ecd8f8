#!/usr/bin/env bash
# Re-fetch the JavaScript libraries the web pages use from the npm registry (no build step): each file is
# copied as published, with its licence, and checked against the hash committed here.
set -euo pipefail
cd "$(dirname "$0")/../slmkit/web/vendor"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fetch() {  # package version file-in-package target sha256
  (cd "$tmp" && npm pack --silent "$1@$2" >/dev/null && mkdir -p "$1" && tar xzf "$1-$2.tgz" -C "$1")
  cp "$tmp/$1/package/$3" "$4"
  cp "$tmp/$1/package/LICENSE" "LICENSE.$1"
  echo "$5  $4" | sha256sum --check --quiet
}
fetch markdown-it 15.0.3 dist/browser/markdown-it.umd.min.js markdown-it.min.js \
  391f2aa638e75e6c7859d0a5c5650ef0956722a45998f17e05b83bc655778e1e
fetch uplot 1.6.32 dist/uPlot.iife.min.js uPlot.iife.min.js \
  19c8d4c6ad88929a79f4ae49d6f7161566dfd0ba3d15cc495e974f787eb78f1f
fetch uplot 1.6.32 dist/uPlot.min.css uPlot.min.css \
  df630c6a8d6f8eeaff264b50f73ce5b114f646ffd9a0bb74f049b0a00135fa04
echo "vendored: $(ls)"
