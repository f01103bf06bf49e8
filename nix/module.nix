# NixOS module for bridge-guard.
#
#   imports = [ ./path/to/bridge-guard/nix/module.nix ];
#   services.bridge-guard = {
#     enable = true;
#     bridges = [ "virbr0" ];
#     settings.bridges.virbr0.ports = [ "vnet*" ];
#   };
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.bridge-guard;
  toml = pkgs.formats.toml { };

  # Every bridge in `bridges` gets a table, so it is guarded even with no settings of its own.
  settings = lib.recursiveUpdate {
    log_format = "journald";
    state_dir = "/run/bridge-guard";
    bridges = lib.genAttrs cfg.bridges (_: { });
  } cfg.settings;

  configFile = toml.generate "bridge-guard.toml" settings;

  capabilities = [
    "CAP_NET_ADMIN" # repair over rtnetlink
    "CAP_BPF" # load the eBPF programs and maps
    "CAP_PERFMON" # attach tracing programs
    "CAP_SYSLOG" # kernel addresses in /proc/kallsyms (tracepoint tier)
    "CAP_SYS_RESOURCE" # RLIMIT_MEMLOCK on kernels before 5.11
    "CAP_NET_RAW" # loop protection: a packet socket per guarded port (probes, BPDU guard)
  ];
in
{
  options.services.bridge-guard = {
    enable = lib.mkEnableOption "bridge-guard, which keeps VM bridges forwarding";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The bridge-guard package to run.";
    };

    bridges = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "virbr0" ];
      description = ''
        Bridges to guard, in the host's network namespace: STP kept off, ports forced to
        forwarding, detached taps re-attached, the bridge kept up.
      '';
    };

    settings = lib.mkOption {
      type = toml.type;
      default = { };
      example = lib.literalExpression ''
        {
          metrics = "127.0.0.1:9558";
          bridges.virbr0.ports = [ "vnet*" ];
        }
      '';
      description = ''
        bridge-guard's configuration, rendered to /etc/bridge-guard/config.toml. See
        packaging/config.example.toml for every key; unknown keys fail the service at start.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = settings.bridges != { };
        message = "services.bridge-guard: list at least one bridge in `bridges` or `settings.bridges`.";
      }
    ];

    environment.etc."bridge-guard/config.toml".source = configFile;
    environment.systemPackages = [ cfg.package ];

    systemd.services.bridge-guard = {
      description = "bridge-guard: keep VM bridges forwarding and account for every outage";
      after = [ "network-pre.target" ];
      wants = [ "network-pre.target" ];
      wantedBy = [ "multi-user.target" ];
      restartTriggers = [ configFile ];

      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${lib.getExe cfg.package} run --config /etc/bridge-guard/config.toml";
        WatchdogSec = "10s";
        Restart = "on-failure";
        RestartSec = "1s";
        RuntimeDirectory = "bridge-guard";

        CapabilityBoundingSet = capabilities;
        AmbientCapabilities = capabilities;
        NoNewPrivileges = true;

        # Same hardening as packaging/systemd/bridge-guard.service, for the same reasons.
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        DevicePolicy = "closed";
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        ProtectProc = "invisible";
        RestrictAddressFamilies = [ "AF_UNIX" "AF_NETLINK" "AF_INET" "AF_INET6" "AF_PACKET" ];
        IPAddressDeny = "any";
        IPAddressAllow = "localhost";
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        RemoveIPC = true;
        KeyringMode = "private";
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "bpf" "perf_event_open" ];
        SystemCallErrorNumber = "EPERM";
        UMask = "0027";
      };
    };
  };
}
