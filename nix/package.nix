# bridge-guard, built from this source tree.
#
# The eBPF programs are built by bridge-guard's build.rs with aya-build, which needs a Rust
# toolchain that can build `core` for the bpfel target (-Z build-std=core: nightly features,
# enabled here on the pinned toolchain with RUSTC_BOOTSTRAP, plus its rust-src) and
# `bpf-linker` built against the same LLVM major as rustc.
{
  lib,
  rustPlatform,
  bpf-linker,
  rust-src ? rustPlatform.rustLibSrc,
}:

rustPlatform.buildRustPackage {
  pname = "bridge-guard";
  version = "0.1.0";

  src = lib.cleanSource ./..;
  cargoLock.lockFile = ../Cargo.lock;

  nativeBuildInputs = [ bpf-linker ];

  # aya-build passes -Z build-std=core when unstable features are allowed.
  RUSTC_BOOTSTRAP = "1";
  __CARGO_TESTS_ONLY_SRC_ROOT = rust-src;
  # Fail the build instead of shipping an agent without its eBPF programs.
  BRIDGE_GUARD_REQUIRE_EBPF = "1";

  cargoBuildFlags = [ "--package" "bridge-guard" ];
  # The test suite needs root and network namespaces: run it with `cargo xtask test`.
  doCheck = false;

  postInstall = ''
    install -Dm644 packaging/systemd/bridge-guard.service $out/lib/systemd/system/bridge-guard.service
    substituteInPlace $out/lib/systemd/system/bridge-guard.service \
      --replace-fail /usr/bin/bridge-guard $out/bin/bridge-guard
    install -Dm644 packaging/config.example.toml $out/share/doc/bridge-guard/config.example.toml
  '';

  meta = {
    description = "Keeps Linux bridges that carry VM traffic forwarding, and accounts for every outage";
    license = with lib.licenses; [ mit asl20 ];
    platforms = lib.platforms.linux;
    mainProgram = "bridge-guard";
  };
}
