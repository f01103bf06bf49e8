//! Membership sources outside the kernel: libvirt's live domain XML says which taps belong to
//! which bridge, even for a bridge recreated before the agent saw its ports.

use std::path::Path;

/// `(bridge, port)` pairs from every `*.xml` in `dir` (libvirt's `/run/libvirt/qemu`): each
/// `<interface>` with `<source bridge=...>` and `<target dev=...>`. A missing directory is no
/// error (no libvirt); an unreadable or malformed file is skipped with a warning.
pub fn libvirt_ports(dir: &Path) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for path in entries.flatten().map(|e| e.path()) {
        if path.extension().is_none_or(|e| e != "xml") {
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(text) => match parse_domain(&text) {
                Ok(pairs) => out.extend(pairs),
                Err(e) => tracing::warn!("skipping {}: {e}", path.display()),
            },
            Err(e) => tracing::warn!("skipping {}: {e}", path.display()),
        }
    }
    out
}

/// The `(bridge, tap)` pairs of one domain XML document.
pub fn parse_domain(xml: &str) -> Result<Vec<(String, String)>, roxmltree::Error> {
    let doc = roxmltree::Document::parse(xml)?;
    let pairs = doc
        .descendants()
        .filter(|n| n.has_tag_name("interface"))
        .filter_map(|iface| {
            let child = |tag: &str| iface.children().find(|c| c.has_tag_name(tag));
            let bridge = child("source")?.attribute("bridge")?;
            let dev = child("target")?.attribute("dev")?;
            Some((bridge.to_owned(), dev.to_owned()))
        })
        .collect();
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bridge_and_network_interfaces_from_live_xml() {
        // Live XML (status wrapper), as libvirt writes under /run/libvirt/qemu.
        let xml = r#"<domstatus state='running' pid='812'>
  <domain type='kvm'>
    <name>guest</name>
    <devices>
      <interface type='network'>
        <mac address='52:54:00:aa:bb:cc'/>
        <source network='default' portid='x' bridge='virbr0'/>
        <target dev='vnet0'/>
      </interface>
      <interface type='bridge'>
        <source bridge='br-lan'/>
        <target dev='vnet1'/>
      </interface>
      <interface type='user'>
        <target dev='ignored'/>
      </interface>
    </devices>
  </domain>
</domstatus>"#;
        assert_eq!(
            parse_domain(xml).expect("parses"),
            [
                ("virbr0".to_owned(), "vnet0".to_owned()),
                ("br-lan".to_owned(), "vnet1".to_owned())
            ]
        );
    }

    #[test]
    fn a_missing_directory_is_empty_and_bad_xml_is_an_error() {
        assert!(libvirt_ports(Path::new("/nonexistent/libvirt")).is_empty());
        assert!(parse_domain("<domain><interface>").is_err());
    }
}
