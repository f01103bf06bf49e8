# NixOS module for bridge-guard: keeps VM bridges forwarding.
#
# With the flake: `imports = [ bridge-guard.nixosModules.default ];` (adds the package too).
# Without: import this file and add the package with nix/overlay.nix:
#
#   imports = [ /path/to/bridge-guard/nix/module.nix ];
#   nixpkgs.overlays = [ (import /path/to/bridge-guard/nix/overlay.nix) ];
#   services.bridge-guard = {
#     enable = true;
#     bridges = [ "virbr0" ];
#     settings.bridges.virbr0.ports = [ "vnet*" ];
#   };
#
# The service is the packaged unit (lib/systemd/system/bridge-guard.service, hardened as
# shipped) through `systemd.packages`, with NixOS's additions as a drop-in. The configuration
# is checked at build time by `bridge-guard check-config`, so a typo fails `nixos-rebuild`
# before anything switches; a changed file then reloads the running agent (SIGHUP: the hooks
# stay attached) unless a key it can only read at start changed, which restarts it.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.bridge-guard;
  settingsFormat = pkgs.formats.toml { };

  # TOML has no null: unset optional keys are left out.
  settings = lib.filterAttrsRecursive (_: v: v != null) cfg.settings;

  # Checked by the agent's own parser: unknown keys, wrong types and impossible values fail the
  # build with file:line:column and a hint.
  configFile =
    pkgs.runCommand "bridge-guard.toml"
      {
        nativeBuildInputs = [ cfg.package ];
        unchecked = settingsFormat.generate "bridge-guard-unchecked.toml" settings;
      }
      ''
        bridge-guard check-config "$unchecked"
        cp "$unchecked" "$out"
      '';

  # Keys the agent reads once at start; the rest (bridges, policy, observe) a reload applies.
  restartKeys = [
    "metrics"
    "metrics_textfile"
    "state_dir"
    "ebpf"
    "log_format"
    "log_level"
    "reconcile_interval_secs"
    "summary_interval_secs"
  ];

  metricsAddress =
    let
      host = cfg.metrics.listenAddress;
    in
    if lib.hasInfix ":" host then "[${host}]:${toString cfg.metrics.port}" else "${host}:${toString cfg.metrics.port}";

  loopback = lib.elem cfg.metrics.listenAddress [
    "127.0.0.1"
    "::1"
    "localhost"
  ];

  bridgeOptions = {
    freeformType = settingsFormat.type;
    options = {
      stp_off = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = "Turn kernel STP off (needed to force ports to forwarding).";
      };
      force_forwarding = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = "Force oper-up ports that are not forwarding to forwarding.";
      };
      reattach = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = "Re-attach member ports that were detached.";
      };
      keep_up = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = "Set the bridge back up when it is set down.";
      };
      allow_unsafe = lib.mkOption {
        type = lib.types.bool;
        default = false;
        description = ''
          Repair even with a physical NIC, tunnel, bond, switchdev port or user-space STP on
          the bridge, where STP may be preventing a real loop. Only if you know the topology.
        '';
      };
      loop_protect = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = ''
          While STP is off, bring bridge-guard's own loop protection: probe frames, BPDU guard
          and MAC-flap detection; a port in a loop is taken out of forwarding. Costs a packet
          socket per guarded port and one small frame per port per probe round.
        '';
      };
      ports = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        example = [ "vnet*" ];
        description = ''
          Ports that always belong to this bridge, by name or glob (`*`, `?`); libvirt's taps
          are `vnet0`, `vnet1`, ...
        '';
      };
    };
  };
in
{
  options.services.bridge-guard = {
    enable = lib.mkEnableOption "bridge-guard, which keeps VM bridges forwarding";

    package = lib.mkPackageOption pkgs "bridge-guard" {
      extraDescription = ''
        Not in nixpkgs: the flake's `nixosModules.default` and `nix/overlay.nix` provide it.
      '';
    };

    bridges = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "virbr0" ];
      description = ''
        Bridges to guard, in the host's network namespace, with the default policy: kernel STP
        kept off, ports forced to forwarding, detached taps re-attached, the bridge kept up.
        Shorthand for an empty `settings.bridges.<name>`; per-bridge policy goes there.
      '';
    };

    metrics = {
      enable = lib.mkEnableOption "the Prometheus metrics endpoint (`/metrics`)";
      listenAddress = lib.mkOption {
        type = lib.types.str;
        default = "127.0.0.1";
        example = "0.0.0.0";
        description = ''
          Address to serve metrics on. The endpoint is unauthenticated: keep it on loopback
          unless the network is yours. The unit only allows loopback traffic
          (`IPAddressAllow=localhost`); another address lifts that.
        '';
      };
      port = lib.mkOption {
        type = lib.types.port;
        default = 19469;
        description = ''
          Port to serve metrics on: the agent's own default. Prometheus' exporter ports
          (9100-9999) are all taken; 9558, the old example, is the systemd exporter's.
        '';
      };
      openFirewall = lib.mkOption {
        type = lib.types.bool;
        default = false;
        description = "Open `metrics.port` in the firewall.";
      };
      textfile = lib.mkOption {
        type = lib.types.nullOr lib.types.path;
        default = null;
        example = "/var/lib/prometheus-node-exporter-text-files/bridge-guard.prom";
        description = ''
          Also keep the metrics in this file, for node_exporter's textfile collector. Its
          directory is made writable for the service (`ReadWritePaths=`) and must exist.
        '';
      };
    };

    settings = lib.mkOption {
      description = ''
        bridge-guard's configuration (RFC 42), rendered to /etc/bridge-guard/config.toml and
        checked at build time. See the package's share/doc/bridge-guard/config.example.toml
        for every key; unknown keys fail the build.
      '';
      default = { };
      example = lib.literalExpression ''
        {
          bridges.virbr0.ports = [ "vnet*" ];
          summary_interval_secs = 3600;
        }
      '';
      type = lib.types.submodule {
        freeformType = settingsFormat.type;
        options = {
          log_format = lib.mkOption {
            type = lib.types.enum [
              "text"
              "json"
              "journald"
            ];
            default = "journald";
            description = ''
              How diagnostics are written. `journald` keeps the structured fields
              (`journalctl -u bridge-guard PORT=vnet0`).
            '';
          };
          log_level = lib.mkOption {
            type = lib.types.nullOr lib.types.str;
            default = null;
            example = "debug";
            description = "Log level (error, warn, info, debug, trace); info when unset.";
          };
          observe = lib.mkOption {
            type = lib.types.bool;
            default = false;
            description = "Repair nothing; log what would be repaired and account for every outage.";
          };
          require_repair = lib.mkOption {
            type = lib.types.bool;
            default = false;
            description = "Fail at start without CAP_NET_ADMIN instead of running observe-only.";
          };
          state_dir = lib.mkOption {
            type = lib.types.str;
            default = "/run/bridge-guard";
            readOnly = true;
            description = ''
              Where the agent publishes its state: the unit's RuntimeDirectory, kept across
              restarts so that a restarted agent remembers the taps it guarded.
            '';
          };
          metrics = lib.mkOption {
            type = lib.types.nullOr lib.types.str;
            default = if cfg.metrics.enable then metricsAddress else null;
            defaultText = lib.literalExpression ''"''${metrics.listenAddress}:''${metrics.port}" when metrics.enable'';
            description = "Metrics address; set it with the `metrics` options.";
          };
          metrics_textfile = lib.mkOption {
            type = lib.types.nullOr lib.types.str;
            default = if cfg.metrics.textfile == null then null else toString cfg.metrics.textfile;
            defaultText = lib.literalExpression "metrics.textfile";
            description = "node_exporter textfile; set it with `metrics.textfile`.";
          };
          bridges = lib.mkOption {
            type = lib.types.attrsOf (lib.types.submodule bridgeOptions);
            default = { };
            example = lib.literalExpression ''{ virbr0.ports = [ "vnet*" ]; }'';
            description = "The bridges to guard, one table each, with their policy.";
          };
        };
      };
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.settings.bridges != { };
        message = "services.bridge-guard: list at least one bridge in `bridges` or `settings.bridges`.";
      }
    ];

    services.bridge-guard.settings.bridges = lib.genAttrs cfg.bridges (_: { });

    environment.etc."bridge-guard/config.toml".source = configFile;
    environment.systemPackages = [ cfg.package ];

    # The packaged unit, as shipped; NixOS adds what follows as a drop-in.
    systemd.packages = [ cfg.package ];
    systemd.services.bridge-guard = {
      wantedBy = [ "multi-user.target" ];
      # A configuration change reloads the agent in place; one of the start-only keys
      # restarts it.
      reloadTriggers = [ configFile ];
      restartTriggers = [ (builtins.toJSON (lib.getAttrs (lib.intersectLists restartKeys (lib.attrNames settings)) settings)) ];
      serviceConfig = {
        # systemd >= 253: `systemctl reload` waits until the agent says the reload is done
        # (RELOADING=1, then READY=1), instead of the packaged unit's bare SIGHUP.
        Type = "notify-reload";
        ExecReload = [ "" ];
        ReadWritePaths = lib.optional (cfg.metrics.textfile != null) (dirOf (toString cfg.metrics.textfile));
        IPAddressAllow = lib.optional (cfg.metrics.enable && !loopback) "any";
      };
    };

    networking.firewall.allowedTCPPorts = lib.optional (
      cfg.metrics.enable && cfg.metrics.openFirewall
    ) cfg.metrics.port;
  };
}
