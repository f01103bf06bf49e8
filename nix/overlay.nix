# Adds `bridge-guard` to nixpkgs, for the NixOS module's `services.bridge-guard.package`.
#
#   nixpkgs.overlays = [ (import /path/to/bridge-guard/nix/overlay.nix) ];
final: _prev: {
  bridge-guard = final.callPackage ./package.nix { };
}
