//! Debian's distribution kernels: which package each series is (from the archive's own meta
//! packages, so the newest ABI is picked without hard-coding it), downloaded once into
//! `<tools>/kernels/`, unpacked with `dpkg -x`, and linked into `/lib/modules/<release>` where
//! `modprobe` in the guest (which shares the host's root filesystem) looks for modules.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::{
    host::{Apt, Archive},
    step,
};

/// A kernel series booted, where its packages come from, and which tests must run there.
#[derive(Debug, PartialEq)]
pub struct Series {
    pub name: &'static str,
    pub archive: Archive,
    /// `BRIDGE_GUARD_EXPECT` in its guest: the requirements a test may not skip on there
    /// (`integration_tests::Need`), beyond the ones every guest expects.
    pub expect: &'static [&'static str],
}

/// The series booted, oldest first: bullseye's 5.10 (the last before BPF memory moved from
/// RLIMIT_MEMLOCK to the memory cgroup, and before module BTF), bookworm's own 6.1, and the
/// 6.12 that bookworm's archive also carries.
pub const SERIES: &[Series] = &[
    Series {
        name: "5.10",
        archive: Archive::Bullseye,
        expect: &["fentry-join", "fentry-leave"],
    },
    Series {
        name: "6.1",
        archive: Archive::Host,
        expect: &["fentry-join", "fentry-leave"],
    },
    Series {
        name: "6.12",
        archive: Archive::Host,
        expect: &["fentry-join", "fentry-leave"],
    },
];

/// The series' names, for messages.
pub fn series_names() -> String {
    SERIES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
}

/// One kernel package, resolved against the archive.
#[derive(Debug, Clone, PartialEq)]
pub struct Kernel {
    pub series: &'static Series,
    /// e.g. `linux-image-6.1.0-56-amd64`.
    pub package: String,
    /// The Debian version, e.g. `6.1.192-2`.
    pub version: String,
    /// What `uname -r` says, e.g. `6.1.0-56-amd64`: the package name without `linux-image-`.
    pub release: String,
}

/// Meta packages that depend on a series' newest kernel: `linux-image-6.12-amd64` exists for
/// non-default series, `linux-image-amd64` points at the distribution's default one.
fn meta_packages(series: &str) -> [String; 2] {
    [
        format!("linux-image-{series}-amd64"),
        "linux-image-amd64".to_owned(),
    ]
}

/// `linux-image-X (= V)` from the Depends line of `meta`'s candidate version.
fn dependency_of(apt: &Apt, archive: Archive, meta: &str) -> Option<(String, String)> {
    let text = apt
        .cache(archive, &["show", "--no-all-versions", meta])
        .ok()?;
    let depends = text.lines().find_map(|l| l.strip_prefix("Depends: "))?;
    depends
        .split([',', '|'])
        .map(str::trim)
        .filter(|d| d.starts_with("linux-image-"))
        .find_map(|d| {
            let (name, rest) = d.split_once(" (= ")?;
            Some((name.to_owned(), rest.strip_suffix(')')?.to_owned()))
        })
}

/// The newest amd64 kernel of `series` in apt's current lists.
fn lookup(apt: &Apt, series: &'static Series) -> Option<Kernel> {
    let prefix = format!("linux-image-{}.", series.name);
    meta_packages(series.name).iter().find_map(|meta| {
        let (package, version) = dependency_of(apt, series.archive, meta)?;
        let release = package.strip_prefix("linux-image-")?.to_owned();
        let plain = !release.ends_with("-unsigned") && !release.ends_with("-dbg");
        (package.starts_with(&prefix) && plain).then_some(Kernel {
            series,
            package,
            version,
            release,
        })
    })
}

/// What the archive offers for `series`, verbatim, for the error when nothing fits.
fn archive_listing(apt: &Apt, series: &Series) -> String {
    let pattern = format!("^linux-image-{}", series.name.replace('.', "\\."));
    let listing = apt
        .cache(series.archive, &["search", "--names-only", &pattern])
        .unwrap_or_else(|e| format!("(apt-cache search failed: {e:#})"));
    if listing.trim().is_empty() {
        format!("`apt-cache search --names-only '{pattern}'` finds nothing")
    } else {
        format!("`apt-cache search --names-only '{pattern}'` shows:\n{listing}")
    }
}

/// Resolves `series`, refreshing apt's lists once when they do not know it (fresh machine).
pub fn resolve(apt: &mut Apt, series: &'static Series) -> Result<Kernel> {
    if let Some(k) = lookup(apt, series) {
        return Ok(k);
    }
    if !apt.updated(series.archive) {
        apt.update_once(series.archive)?;
        if let Some(k) = lookup(apt, series) {
            return Ok(k);
        }
    }
    let name = series.name;
    bail!(
        "no Debian kernel package for the {name} series in {}: none of {} depends on a \
         linux-image-{name}.* package. {}",
        series.archive.describe(),
        meta_packages(name).join(", "),
        archive_listing(apt, series)
    )
}

/// Whether `--kernel FILTER` selects this kernel. A bare series name selects exactly that
/// series (`6.1` must not also pick `6.12.x`); anything else is a substring of the release.
pub fn selected(filter: Option<&str>, series: &str, release: Option<&str>) -> bool {
    let Some(f) = filter else {
        return true;
    };
    if SERIES.iter().any(|s| s.name == f) {
        return f == series;
    }
    series.contains(f) || release.is_some_and(|r| r.contains(f))
}

/// A kernel unpacked in the cache: its image and its module tree.
pub struct Installed {
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

fn cache_dir(tools: &Path, k: &Kernel) -> PathBuf {
    tools
        .join("kernels")
        .join(format!("{}_{}", k.package, k.version))
}

/// Where `dpkg -x` put the image and modules (`/lib` or merged `/usr/lib`).
fn locate(root: &Path, release: &str) -> Result<Installed> {
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d).join(release))
        .find(|p| p.is_dir())
        .with_context(|| format!("no lib/modules/{release} in {}", root.display()))?;
    if !vmlinuz.is_file() {
        bail!("no {} in the package", vmlinuz.display());
    }
    Ok(Installed { vmlinuz, modules })
}

/// The cached kernel, downloading and unpacking it first when it is not there yet.
pub fn fetch(tools: &Path, apt: &mut Apt, k: &mut Kernel) -> Result<Installed> {
    let mut dir = cache_dir(tools, k);
    if !dir.join(".complete").is_file() && !apt.updated(k.series.archive) {
        // Stale lists may name a package the archive no longer has: refresh, then look again.
        apt.update_once(k.series.archive)?;
        *k = resolve(apt, k.series)?;
        dir = cache_dir(tools, k);
    }
    if dir.join(".complete").is_file() {
        step(&format!("{} {} is cached", k.package, k.version));
    } else {
        download(apt, k, &dir)?;
    }
    locate(&dir.join("root"), &k.release)
}

/// `apt-get download` + `dpkg -x` into `<dir>.partial`, renamed to `dir` only when complete,
/// so an interrupted run leaves nothing that looks cached.
fn download(apt: &Apt, k: &Kernel, dir: &Path) -> Result<()> {
    let mut name = dir.file_name().unwrap_or_default().to_owned();
    name.push(".partial");
    let partial = dir.with_file_name(name);
    let _ = std::fs::remove_dir_all(&partial);
    let debs = partial.join("deb");
    std::fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    step(&format!("downloading {} {}", k.package, k.version));
    // apt's sandbox user cannot write into root's tools directory; it is our own download.
    crate::run(
        apt.command(k.series.archive, "apt-get")
            .args(["download", "-o", "APT::Sandbox::User=root"])
            .arg(format!("{}={}", k.package, k.version))
            .current_dir(&debs),
    )
    .with_context(|| format!("cannot download {} {}", k.package, k.version))?;
    let deb = std::fs::read_dir(&debs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    step(&format!("unpacking {}", deb.display()));
    crate::run(
        Command::new("dpkg")
            .arg("-x")
            .arg(&deb)
            .arg(partial.join("root")),
    )?;
    std::fs::remove_dir_all(&debs)?;
    locate(&partial.join("root"), &k.release)?;
    std::fs::write(
        partial.join(".complete"),
        format!("{} {}\n", k.package, k.version),
    )?;
    std::fs::rename(&partial, dir)
        .with_context(|| format!("renaming {} to {}", partial.display(), dir.display()))
}

/// Makes `/lib/modules/<release>` the cached module tree, with the image beside it as
/// `vmlinuz` (where `vng -r <release>` looks), and runs `depmod` once.
pub fn link_modules(k: &Kernel, inst: &Installed) -> Result<()> {
    let link = Path::new("/lib/modules").join(&k.release);
    match std::fs::symlink_metadata(&link) {
        Ok(m) if m.is_dir() => {
            // A kernel installed from a package: its tree and /boot/vmlinuz-<release> serve.
            step(&format!("{} is a real directory: using it", link.display()));
            let boot = Path::new("/boot").join(format!("vmlinuz-{}", k.release));
            if !link.join("vmlinuz").exists() && !boot.exists() {
                bail!(
                    "{} has no vmlinuz and there is no {}",
                    link.display(),
                    boot.display()
                );
            }
            return depmod(k, &link);
        }
        Ok(_) if std::fs::read_link(&link).ok().as_deref() == Some(inst.modules.as_path()) => {}
        Ok(_) => {
            // Only vmtest puts symlinks here (from another cache or tools directory).
            std::fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
            symlink(&inst.modules, &link)?;
        }
        Err(_) => {
            std::fs::create_dir_all("/lib/modules")?;
            symlink(&inst.modules, &link)?;
        }
    }
    let image = inst.modules.join("vmlinuz");
    if std::fs::read_link(&image).ok().as_deref() != Some(inst.vmlinuz.as_path()) {
        let _ = std::fs::remove_file(&image);
        symlink(&inst.vmlinuz, &image)?;
    }
    depmod(k, &link)
}

fn symlink(target: &Path, link: &Path) -> Result<()> {
    step(&format!(
        "linking {} -> {}",
        link.display(),
        target.display()
    ));
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} to {}", link.display(), target.display()))
}

/// Packages ship no modules.dep (their postinst makes it): without it modprobe finds nothing.
fn depmod(k: &Kernel, tree: &Path) -> Result<()> {
    if tree.join("modules.dep").is_file() {
        return Ok(());
    }
    step(&format!("depmod {}", k.release));
    crate::run(Command::new("depmod").arg(&k.release))
}

#[cfg(test)]
mod tests {
    use super::selected;

    #[test]
    fn series_names_select_exactly_and_other_filters_match_releases() {
        assert!(selected(None, "6.12", None));
        assert!(selected(Some("6.1"), "6.1", Some("6.1.0-56-amd64")));
        assert!(!selected(Some("6.1"), "6.12", Some("6.12.117+deb12-amd64")));
        assert!(selected(
            Some("6.12.117"),
            "6.12",
            Some("6.12.117+deb12-amd64")
        ));
        assert!(!selected(
            Some("6.1.0"),
            "6.12",
            Some("6.12.117+deb12-amd64")
        ));
        assert!(selected(
            Some("amd64"),
            "6.12",
            Some("6.12.117+deb12-amd64")
        ));
    }
}
