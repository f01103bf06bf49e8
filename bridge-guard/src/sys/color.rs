//! Colour in terminal output: `--color=auto|always|never`, and `NO_COLOR` (no-color.org)
//! for `auto`.

use std::io::IsTerminal as _;

/// When to colour output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// When writing to a terminal and `NO_COLOR` is unset or empty.
    #[default]
    Auto,
    Always,
    Never,
}

/// How to mark up text: plain, or with ANSI colours.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Style {
    pub color: bool,
}

impl Style {
    /// The style for standard output under `choice`.
    pub fn stdout(choice: ColorChoice) -> Self {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Self::decide(choice, no_color, std::io::stdout().is_terminal())
    }

    fn decide(choice: ColorChoice, no_color: bool, terminal: bool) -> Self {
        let color = match choice {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => terminal && !no_color,
        };
        Self { color }
    }

    fn paint(self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    /// Something as it should be.
    pub fn good(self, text: &str) -> String {
        self.paint("32", text)
    }

    /// Something wrong.
    pub fn bad(self, text: &str) -> String {
        self.paint("1;31", text)
    }

    /// Something to look at.
    pub fn warn(self, text: &str) -> String {
        self.paint("33", text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_color_and_terminals_decide_auto_only() {
        use ColorChoice::*;
        assert!(Style::decide(Auto, false, true).color);
        assert!(!Style::decide(Auto, true, true).color, "NO_COLOR");
        assert!(!Style::decide(Auto, false, false).color, "not a terminal");
        assert!(Style::decide(Always, true, false).color);
        assert!(!Style::decide(Never, false, true).color);
        assert_eq!(Style { color: false }.bad("x"), "x");
        assert_eq!(Style { color: true }.good("x"), "\x1b[32mx\x1b[0m");
    }
}
