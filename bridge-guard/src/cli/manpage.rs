//! `bridge-guard manpage [DIR]`: the manual pages, generated with clap_mangen from the parser's
//! own definitions, so they never go stale. Section 8: it is a system daemon.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::CommandFactory as _;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Write bridge-guard.8 and bridge-guard-SUBCOMMAND.8 into DIR; without it, print
    /// bridge-guard.8 on stdout.
    #[arg(value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// The pages: (file name, roff), the main one first.
fn pages() -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut cmd = super::Cli::command();
    // Building names each subcommand `bridge-guard-NAME`, the title clap_mangen gives its page
    // and the name the main page's SUBCOMMANDS section refers to.
    cmd.build();
    let mut pages = Vec::new();
    let mut main = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .render(&mut main)
        .context("rendering bridge-guard.8")?;
    pages.push(("bridge-guard.8".to_owned(), main));
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = sub
            .get_display_name()
            .map_or_else(|| format!("bridge-guard-{}", sub.get_name()), str::to_owned);
        let mut page = Vec::new();
        clap_mangen::Man::new(sub.clone())
            .section("8")
            .render(&mut page)
            .with_context(|| format!("rendering {name}.8"))?;
        pages.push((format!("{name}.8"), page));
    }
    Ok(pages)
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let pages = pages()?;
    let Some(dir) = &args.dir else {
        use std::io::Write as _;
        return std::io::stdout()
            .write_all(&pages[0].1)
            .context("writing the page");
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, roff) in &pages {
        let path = dir.join(name);
        std::fs::write(&path, roff).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_cover_the_daemon_and_each_subcommand() {
        let pages = pages().expect("pages");
        let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[0], "bridge-guard.8");
        for sub in [
            "run",
            "fix",
            "check-config",
            "status",
            "watch",
            "doctor",
            "completions",
        ] {
            assert!(
                names.contains(&format!("bridge-guard-{sub}.8").as_str()),
                "no page for {sub}: {names:?}"
            );
        }
        let main = String::from_utf8(pages[0].1.clone()).expect("roff is UTF-8");
        assert!(
            main.starts_with(".ie \\n(.g .ds Aq"),
            "roff preamble: {}",
            &main[..40]
        );
        assert!(main.contains(".TH bridge-guard 8"), "section 8 title");
        assert!(
            main.contains("EX_CONFIG"),
            "the exit statuses are documented"
        );
        assert!(
            main.contains("bridge\\-guard\\-run(8)"),
            "refers to the run page"
        );
        let run = String::from_utf8(pages[1].1.clone()).expect("roff is UTF-8");
        assert!(run.contains("\\-\\-bridge"), "run's page lists --bridge");
    }
}
