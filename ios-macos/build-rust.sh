#!/usr/bin/env bash
# Builds the agent's C ABI (crate ztna-agent-ffi, agent-ffi/) as a static library for
# Apple Silicon and Intel Macs and joins the two into one universal library,
# ios-macos/build/libztna_agent_ffi.a, which the packet tunnel target links. The
# header it matches is agent-ffi/include/ztna_agent.h (committed; imported through
# ios-macos/ZtnaAgentFFI/module.modulemap).
#
# Run it from anywhere on a Mac with rustup, Xcode (or its command line tools) and
# cmake; Xcode also runs it before each build of the extension.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
out="$here/build"
targets=(aarch64-apple-darwin x86_64-apple-darwin)

if [[ "$(uname -s)" != Darwin ]]; then
    echo "build-rust.sh: builds Apple libraries; run it on macOS" >&2
    exit 1
fi
# Xcode runs build phases with a minimal PATH.
export PATH="$HOME/.cargo/bin:/opt/homebrew/bin:/usr/local/bin:$PATH"
for tool in cargo rustup cmake lipo; do
    if ! command -v "$tool" >/dev/null; then
        echo "build-rust.sh: $tool not found (see ios-macos/README.md, prerequisites)" >&2
        exit 1
    fi
done

installed="$(rustup target list --installed)"
for t in "${targets[@]}"; do
    if ! grep -qx "$t" <<<"$installed"; then
        echo "build-rust.sh: adding the Rust target $t"
        rustup target add "$t"
    fi
done

# The deployment target of the app; rustc and BoringSSL's cmake build read it.
export MACOSX_DEPLOYMENT_TARGET="${MACOSX_DEPLOYMENT_TARGET:-13.0}"

libs=()
for t in "${targets[@]}"; do
    cargo build --manifest-path "$root/Cargo.toml" --release -p ztna-agent-ffi --lib --target "$t"
    libs+=("$root/target/$t/release/libztna_agent_ffi.a")
done

mkdir -p "$out"
lipo -create -output "$out/libztna_agent_ffi.a" "${libs[@]}"
lipo -info "$out/libztna_agent_ffi.a"
echo "build-rust.sh: $out/libztna_agent_ffi.a (header: $root/agent-ffi/include/ztna_agent.h)"
