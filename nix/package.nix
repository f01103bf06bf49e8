# bridge-guard, built from this source tree in Nix's sandbox, with no network.
#
# The eBPF programs are built by bridge-guard/build.rs with aya-build: `cargo build -Z
# build-std=core` for the bpfel target. That resolves the standard library's own crates.io
# dependencies (rust-src's library/Cargo.lock), which a vendor directory made from the
# project's Cargo.lock alone does not have, so a sandboxed build fails (crane issues 260 and
# 285). As `cargo xtask dist` does, the vendor directory here holds both sets.
{
  lib,
  stdenv,
  rustPlatform,
  symlinkJoin,
  bpf-linker,
  installShellFiles,
  coreutils,
  # The standard library's sources (its Cargo.toml and Cargo.lock at the top), for build-std.
  rustLibSrc ? rustPlatform.rustLibSrc,
}:

let
  # Only what the build reads: never target/, never editor or VCS files.
  src = lib.fileset.toSource {
    root = ./..;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../.cargo
      ../bridge-guard
      ../bridge-guard-common
      ../bridge-guard-ebpf
      # Patched dependencies, built from here (the workspace's `[patch.crates-io]`).
      ../third_party
      # Workspace members: cargo reads their manifests even when building one package.
      ../netlab
      ../tests
      ../xtask
      ../packaging
      ../README.md
      ../LICENSE-MIT
      ../LICENSE-APACHE
      (lib.fileset.maybeMissing ../monitoring)
    ];
  };

  # The project's crates, then the standard library's: one vendor directory. The project's
  # Cargo.lock and cargo configuration come first, so they are the ones the build checks.
  cargoDeps = symlinkJoin {
    name = "bridge-guard-vendor";
    paths = [
      (rustPlatform.importCargoLock { lockFile = ../Cargo.lock; })
      (rustPlatform.importCargoLock { lockFile = "${rustLibSrc}/Cargo.lock"; })
    ];
  };

  canRun = stdenv.buildPlatform.canExecute stdenv.hostPlatform;
in
rustPlatform.buildRustPackage {
  pname = "bridge-guard";
  version = (lib.importTOML ../bridge-guard/Cargo.toml).package.version;
  inherit src cargoDeps;

  # bpf-linker links the eBPF object; its LLVM major must be the one rustc uses (the same
  # check `cargo xtask setup` makes): override `bpf-linker` if nixpkgs' differ.
  nativeBuildInputs = [
    bpf-linker
    installShellFiles
  ];

  env = {
    # aya-build passes -Z build-std=core when unstable features are allowed, and the library's
    # manifest needs cargo features of a nightly: the stable toolchain, allowed both.
    RUSTC_BOOTSTRAP = "1";
    # Where cargo's build-std takes the standard library's sources from.
    __CARGO_TESTS_ONLY_SRC_ROOT = "${rustLibSrc}";
    # Fail the build rather than ship an agent without its eBPF programs.
    BRIDGE_GUARD_REQUIRE_EBPF = "1";
  };

  cargoBuildFlags = [
    "--package"
    "bridge-guard"
  ];
  # The test suite needs root, network namespaces and a kernel to load eBPF into: it runs
  # with `cargo xtask test`. The flake's `checks.nixos` runs the unit in a NixOS VM.
  doCheck = false;

  postInstall = ''
    install -Dm644 packaging/systemd/bridge-guard.service $out/lib/systemd/system/bridge-guard.service
    substituteInPlace $out/lib/systemd/system/bridge-guard.service \
      --replace-fail /usr/bin/bridge-guard $out/bin/bridge-guard \
      --replace-fail /bin/kill ${coreutils}/bin/kill
    install -Dm644 packaging/config.example.toml $out/share/doc/bridge-guard/config.example.toml
    if [ -d monitoring ]; then
      mkdir -p $out/share/bridge-guard
      cp -r monitoring $out/share/bridge-guard/
    fi
  ''
  + lib.optionalString canRun ''
    $out/bin/bridge-guard manpage man8
    installManPage man8/*.8
    installShellCompletion --cmd bridge-guard \
      --bash <($out/bin/bridge-guard completions bash) \
      --zsh <($out/bin/bridge-guard completions zsh) \
      --fish <($out/bin/bridge-guard completions fish)
  '';

  # `--version` says whether the eBPF object is embedded: a build without it is a failure.
  doInstallCheck = canRun;
  installCheckPhase = ''
    runHook preInstallCheck
    $out/bin/bridge-guard --version | grep -F '(eBPF programs embedded: '
    $out/bin/bridge-guard check-config packaging/config.example.toml
    runHook postInstallCheck
  '';

  meta = {
    description = "Keeps Linux bridges that carry VM traffic forwarding, and accounts for every outage";
    longDescription = ''
      bridge-guard watches the kernel's bridge port states and memberships with eBPF and
      rtnetlink and repairs, within about a millisecond, what breaks guests' networking when
      the network around a VM bridge churns: kernel STP left on with ports listening, taps
      detached, the bridge down or recreated. Bridges with physical NICs, tunnels or
      user-space STP are left alone.
    '';
    license = with lib.licenses; [
      mit
      asl20
    ];
    platforms = lib.platforms.linux;
    mainProgram = "bridge-guard";
  };
}
