//! `bridge-guard completions SHELL`: a completion script for the shell, generated from the same
//! definitions as the parser, so it never goes stale.

use clap::CommandFactory as _;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let mut cmd = super::Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "bridge-guard", &mut std::io::stdout());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(shell: clap_complete::Shell) -> String {
        let mut out = Vec::new();
        clap_complete::generate(
            shell,
            &mut super::super::Cli::command(),
            "bridge-guard",
            &mut out,
        );
        String::from_utf8(out).expect("UTF-8 script")
    }

    #[test]
    fn every_shell_completes_subcommands_and_their_flags() {
        use clap_complete::Shell;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let s = script(shell);
            // Flags without their dashes: fish spells them `-l port-pattern`.
            for word in [
                "run",
                "check-config",
                "doctor",
                "manpage",
                "port-pattern",
                "state-dir",
            ] {
                assert!(s.contains(word), "{shell} completions lack {word}");
            }
        }
        assert!(script(Shell::Bash).contains("complete -F"), "a bash script");
        assert!(
            script(Shell::Zsh).starts_with("#compdef bridge-guard"),
            "a zsh script"
        );
        assert!(
            script(Shell::Fish).contains("complete -c bridge-guard"),
            "a fish script"
        );
    }
}
