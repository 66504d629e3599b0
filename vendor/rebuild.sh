#!/usr/bin/env bash
# vendor/candle-core/ is candle-core 0.11.1 exactly as published on crates.io (Cargo.toml, LICENSE,
# README.md, src/) plus vendor/candle-core.patch, and nothing else. This script proves it, or
# rebuilds the folder from those two:
#   vendor/rebuild.sh --check   # fail, showing the difference, unless the folder is exactly that (CI)
#   vendor/rebuild.sh           # rewrite vendor/candle-core/ from the published crate and the patch
# The crate comes from the registry through cargo itself (a throwaway project that depends on it,
# resolved with the workspace's Cargo.lock, so nothing else is downloaded).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
version=0.11.1
check=false
case ${1:-} in
    --check) check=true ;;
    "") ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/fetch/src"
: >"$work/fetch/src/lib.rs"
cat >"$work/fetch/Cargo.toml" <<TOML
[package]
name = "fetch-candle-core"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
candle-core = { version = "=$version", default-features = false }

[workspace]
TOML
cp "$here/../Cargo.lock" "$work/fetch/"
cargo fetch --quiet --manifest-path "$work/fetch/Cargo.toml"
crate=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/cache" -name "candle-core-$version.crate" | head -n 1)
[[ -n $crate ]] || { echo "cargo fetch left no candle-core-$version.crate in the registry cache" >&2; exit 1; }
tar xzf "$crate" -C "$work"

mkdir "$work/tree"
cp -r "$work/candle-core-$version"/{Cargo.toml,LICENSE,README.md,src} "$work/tree/"
patch --quiet --directory="$work/tree" -p1 <"$here/candle-core.patch"

if $check; then
    if diff -r "$work/tree" "$here/candle-core"; then
        echo "vendor/candle-core is candle-core $version + vendor/candle-core.patch, exactly"
    else
        echo "vendor/candle-core differs from candle-core $version + vendor/candle-core.patch (above);" \
            "put the change in the patch and run vendor/rebuild.sh" >&2
        exit 1
    fi
else
    rm -rf "$here/candle-core"
    mv "$work/tree" "$here/candle-core"
    echo "rebuilt vendor/candle-core from candle-core $version + vendor/candle-core.patch"
fi
