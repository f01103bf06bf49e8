//! Membership sources outside the kernel: libvirt's live state says which taps belong to which
//! bridge, even for a bridge recreated before the agent saw its ports.
//!
//! libvirt keeps one live XML file per running domain under `<run dir>/qemu` and one status
//! file per active network under `<run dir>/network`. A guest's `<interface type='bridge'>`
//! names its bridge; an `<interface type='network'>` (the common case, libvirt's `default`
//! network) names only the network — libvirt 9.0 writes `<source network='default'
//! portid='…'/>` with no `bridge` — so the network's status file resolves it to the bridge the
//! network runs on now. The `<actual>` element libvirt adds when it plugs the tap is the
//! fallback while the network is down (its status file is gone then).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Serialize;

/// Where libvirt keeps its live state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibvirtDirs {
    /// Live domain XML (`/run/libvirt/qemu`).
    pub domains: PathBuf,
    /// Active networks' status (`/run/libvirt/network`).
    pub networks: PathBuf,
}

impl LibvirtDirs {
    /// From the configured directory: libvirt's run directory (`/run/libvirt`) or, its older
    /// meaning, the `qemu` directory inside it; the network directory is `qemu`'s sibling.
    pub fn new(dir: &Path) -> Self {
        if dir.file_name().is_some_and(|n| n == "qemu") {
            let root = dir.parent().unwrap_or(dir);
            Self {
                domains: dir.to_owned(),
                networks: root.join("network"),
            }
        } else {
            Self {
                domains: dir.join("qemu"),
                networks: dir.join("network"),
            }
        }
    }
}

/// One guest interface on a bridge, as libvirt's live state describes it: what
/// `bridge_guard_port_info{bridge,port,domain,mac}` shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Interface {
    /// The domain (guest) name.
    pub domain: String,
    /// The guest's MAC address, as libvirt wrote it (the tap's own MAC differs).
    pub mac: String,
    /// The tap (`<target dev>`), e.g. `vnet0`.
    pub dev: String,
    pub bridge: String,
}

/// Where an interface's XML says it is plugged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `<interface type='bridge'>`: `<source bridge=…>`.
    Bridge(String),
    /// `<interface type='network'>`: `<source network=…>`, with the bridge of libvirt's
    /// `<actual>` element when it wrote one.
    Network {
        network: String,
        actual_bridge: Option<String>,
    },
}

/// One `<interface>` of a domain's XML that has a tap and a source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainInterface {
    pub domain: String,
    pub mac: String,
    pub dev: String,
    pub source: Source,
}

/// [`libvirt_interfaces`] of the configured libvirt directory (see [`LibvirtDirs::new`]).
pub fn libvirt_ports(dir: &Path) -> Vec<Interface> {
    libvirt_interfaces(&LibvirtDirs::new(dir))
}

/// Every guest interface on a bridge, from every `*.xml` under `dirs.domains`, with network
/// interfaces resolved through the networks' status. A missing directory is no error (no
/// libvirt); an unreadable or malformed file is skipped with a warning, and an interface whose
/// bridge cannot be told is skipped with a debug line.
pub fn libvirt_interfaces(dirs: &LibvirtDirs) -> Vec<Interface> {
    let mut bridges: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut out = Vec::new();
    for (path, text) in xml_files(&dirs.domains) {
        let ifaces = match parse_domain(&text) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!("skipping {}: {e}", path.display());
                continue;
            }
        };
        for iface in ifaces {
            let bridge = match &iface.source {
                Source::Bridge(b) => Some(b.clone()),
                Source::Network {
                    network,
                    actual_bridge,
                } => bridges
                    .entry(network.clone())
                    .or_insert_with(|| network_bridge(&dirs.networks, network))
                    .clone()
                    .or_else(|| actual_bridge.clone()),
            };
            match bridge {
                Some(bridge) => out.push(Interface {
                    domain: iface.domain,
                    mac: iface.mac,
                    dev: iface.dev,
                    bridge,
                }),
                None => tracing::debug!(
                    "{} of {}: its network's bridge is unknown (network not running?)",
                    iface.dev,
                    iface.domain
                ),
            }
        }
    }
    out
}

/// The bridges of libvirt's active networks, from their status files: bridges libvirt builds
/// (creates down, configures, then raises) whenever it starts the network.
pub fn libvirt_network_bridges(dirs: &LibvirtDirs) -> Vec<String> {
    xml_files(&dirs.networks)
        .into_iter()
        .filter_map(|(path, text)| match parse_network_status(&text) {
            Ok(found) => found.map(|(_, bridge)| bridge),
            Err(e) => {
                tracing::warn!("skipping {}: {e}", path.display());
                None
            }
        })
        .collect()
}

/// `(path, text)` of every readable `*.xml` in `dir`.
fn xml_files(dir: &Path) -> Vec<(PathBuf, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for path in entries.flatten().map(|e| e.path()) {
        if path.extension().is_none_or(|e| e != "xml") {
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(text) => out.push((path, text)),
            Err(e) => tracing::warn!("skipping {}: {e}", path.display()),
        }
    }
    out.sort();
    out
}

/// The bridge active network `network` runs on, from `<dir>/<network>.xml`.
fn network_bridge(dir: &Path, network: &str) -> Option<String> {
    // A network name comes from XML: never let it leave the directory.
    if network.is_empty() || network.contains('/') || network.starts_with('.') {
        return None;
    }
    let path = dir.join(format!("{network}.xml"));
    let text = std::fs::read_to_string(&path).ok()?;
    match parse_network_status(&text) {
        Ok(Some((name, bridge))) if name == network => Some(bridge),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!("skipping {}: {e}", path.display());
            None
        }
    }
}

/// `(network name, bridge name)` of a network status document (`<networkstatus>` as libvirt
/// writes under /run/libvirt/network, or a bare `<network>`); `None` when it names no bridge.
pub fn parse_network_status(xml: &str) -> Result<Option<(String, String)>, roxmltree::Error> {
    let doc = roxmltree::Document::parse(xml)?;
    let Some(net) = doc.descendants().find(|n| n.has_tag_name("network")) else {
        return Ok(None);
    };
    let child = |tag: &str| net.children().find(|c| c.has_tag_name(tag));
    let name = child("name").and_then(|n| n.text()).map(str::trim);
    let bridge = child("bridge").and_then(|b| b.attribute("name"));
    Ok(name.zip(bridge).map(|(n, b)| (n.to_owned(), b.to_owned())))
}

/// The interfaces of one domain XML document (live `<domstatus>` or a bare `<domain>`) that
/// have a tap and a bridge or network source.
pub fn parse_domain(xml: &str) -> Result<Vec<DomainInterface>, roxmltree::Error> {
    let doc = roxmltree::Document::parse(xml)?;
    let Some(domain) = doc.descendants().find(|n| n.has_tag_name("domain")) else {
        return Ok(Vec::new());
    };
    let name = domain
        .children()
        .find(|c| c.has_tag_name("name"))
        .and_then(|n| n.text())
        .map_or_else(String::new, |n| n.trim().to_owned());
    let ifaces = domain
        .descendants()
        .filter(|n| n.has_tag_name("interface"))
        .filter_map(|iface| {
            let child = |tag: &str| iface.children().find(|c| c.has_tag_name(tag));
            let source = child("source")?;
            let dev = child("target")?.attribute("dev")?;
            let source = match iface.attribute("type") {
                Some("network") => Source::Network {
                    network: source.attribute("network")?.to_owned(),
                    // Older libvirt wrote the bridge on the source itself.
                    actual_bridge: child("actual")
                        .and_then(|a| a.children().find(|c| c.has_tag_name("source")))
                        .and_then(|s| s.attribute("bridge"))
                        .or_else(|| source.attribute("bridge"))
                        .map(str::to_owned),
                },
                _ => Source::Bridge(source.attribute("bridge")?.to_owned()),
            };
            Some(DomainInterface {
                domain: name.clone(),
                mac: child("mac")
                    .and_then(|m| m.attribute("address"))
                    .unwrap_or_default()
                    .to_owned(),
                dev: dev.to_owned(),
                source,
            })
        })
        .collect();
    Ok(ifaces)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files libvirt 9.0 (Debian 12) wrote in the test suite's libvirt lab: guest0 with a
    /// network interface, a bridge interface and a hot-plugged USB network interface; the
    /// `default` (virbr0) and `second` (virbr1) networks' status.
    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/libvirt-9.0")
    }

    fn iface(dev: &str, mac: &str, bridge: &str) -> Interface {
        Interface {
            domain: "guest0".into(),
            mac: mac.into(),
            dev: dev.into(),
            bridge: bridge.into(),
        }
    }

    #[test]
    fn resolves_network_interfaces_through_the_networks_status() {
        let dirs = LibvirtDirs::new(&fixtures().join("qemu"));
        assert_eq!(dirs.networks, fixtures().join("network"));
        assert_eq!(
            libvirt_interfaces(&dirs),
            [
                iface("vnet33", "52:54:00:74:c9:c2", "virbr0"),
                iface("vnet34", "52:54:00:a7:10:9a", "virbr1"),
                iface("vnet35", "52:54:00:38:ed:23", "virbr0"),
            ]
        );
        // The run directory itself names the same files.
        assert_eq!(LibvirtDirs::new(&fixtures()), dirs);
        assert_eq!(libvirt_network_bridges(&dirs), ["virbr0", "virbr1"]);
    }

    #[test]
    fn libvirt_writes_no_bridge_on_a_network_source() {
        let xml = std::fs::read_to_string(fixtures().join("qemu/guest0.xml")).expect("fixture");
        let ifaces = parse_domain(&xml).expect("parses");
        assert_eq!(
            ifaces[0].source,
            Source::Network {
                network: "default".into(),
                actual_bridge: Some("virbr0".into())
            }
        );
        assert_eq!(ifaces[1].source, Source::Bridge("virbr1".into()));
        let status =
            std::fs::read_to_string(fixtures().join("network/default.xml")).expect("fixture");
        assert_eq!(
            parse_network_status(&status).expect("parses"),
            Some(("default".into(), "virbr0".into()))
        );
    }

    #[test]
    fn the_networks_current_bridge_wins_and_actual_is_the_fallback() {
        let dir = std::env::temp_dir().join(format!("bg-membership-{}", std::process::id()));
        let (qemu, network) = (dir.join("qemu"), dir.join("network"));
        std::fs::create_dir_all(&qemu).expect("mkdir");
        std::fs::create_dir_all(&network).expect("mkdir");
        std::fs::copy(fixtures().join("qemu/guest0.xml"), qemu.join("guest0.xml")).expect("cp");
        let dirs = LibvirtDirs::new(&dir);
        // The network is down (no status file): libvirt's <actual> still says where it was.
        let bridges: Vec<String> = libvirt_interfaces(&dirs)
            .into_iter()
            .map(|i| i.bridge)
            .collect();
        assert_eq!(bridges, ["virbr0", "virbr1", "virbr0"]);
        // The network now runs on another bridge: that one.
        let moved = std::fs::read_to_string(fixtures().join("network/default.xml"))
            .expect("fixture")
            .replace("name='virbr0'", "name='virbr7'");
        std::fs::write(network.join("default.xml"), moved).expect("write");
        let bridges: Vec<String> = libvirt_interfaces(&dirs)
            .into_iter()
            .map(|i| i.bridge)
            .collect();
        assert_eq!(bridges, ["virbr7", "virbr1", "virbr7"]);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_missing_directory_is_empty_and_bad_xml_is_an_error() {
        let dirs = LibvirtDirs::new(Path::new("/nonexistent/libvirt"));
        assert!(libvirt_interfaces(&dirs).is_empty());
        assert!(parse_domain("<domain><interface>").is_err());
        assert!(parse_network_status("<network>").is_err());
        assert_eq!(
            network_bridge(&fixtures().join("network"), "../qemu/x"),
            None
        );
    }
}
