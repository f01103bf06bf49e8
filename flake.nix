{
  description = "bridge-guard: keeps Linux bridges that carry VM traffic forwarding, and accounts for every outage";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      # eBPF and rtnetlink: Linux only.
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      overlays.default = import ./nix/overlay.nix;

      packages = forAllSystems (pkgs: rec {
        bridge-guard = pkgs.callPackage ./nix/package.nix { };
        default = bridge-guard;
      });

      # The module, with the package it runs.
      nixosModules.default = {
        imports = [ ./nix/module.nix ];
        nixpkgs.overlays = [ self.overlays.default ];
      };

      checks = forAllSystems (pkgs: {
        # The sandboxed build itself: no network, eBPF embedded (its install check says so).
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;

        # The module in a NixOS VM: the packaged unit starts, guards a bridge made with kernel
        # STP on, and a reload applies a changed configuration without a restart.
        nixos = pkgs.testers.runNixOSTest {
          name = "bridge-guard";
          nodes.machine =
            { pkgs, ... }:
            {
              imports = [ self.nixosModules.default ];
              environment.systemPackages = [ pkgs.curl ];
              services.bridge-guard = {
                enable = true;
                bridges = [ "br0" ];
                metrics.enable = true;
              };
              specialisation.observe.configuration.services.bridge-guard.settings.observe = true;
            };
          testScript = ''
            machine.wait_for_unit("bridge-guard.service")
            machine.succeed("ip link add br0 type bridge stp_state 1 && ip link set br0 up")
            machine.wait_until_succeeds("ip -d link show br0 | grep -q 'stp_state 0'")
            machine.succeed("curl -sf http://127.0.0.1:19469/metrics | grep -q bridge_guard_")
            pid = machine.succeed("systemctl show -p MainPID --value bridge-guard").strip()
            machine.succeed("/run/current-system/specialisation/observe/bin/switch-to-configuration test")
            machine.wait_until_succeeds("journalctl -u bridge-guard | grep -q 'reload: configuration'")
            assert pid == machine.succeed("systemctl show -p MainPID --value bridge-guard").strip()
          '';
        };
      });
    };
}
