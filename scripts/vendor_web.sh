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
echo "vendored: $(ls)"
