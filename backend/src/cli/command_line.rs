//! Options written back as command-line arguments, for a child process
//! whose clap definitions parse them to the same values.

use std::ffi::{OsStr, OsString};

/// Arguments being written, each option as a person writes it: `--name
/// value`, or `--name=value` for a value that starts with `-`, which clap
/// would otherwise take for an option of its own.
#[derive(Debug, Default)]
pub struct CommandLine {
    args: Vec<OsString>,
}

impl CommandLine {
    /// `--name value`.
    pub fn option(&mut self, name: &str, value: impl AsRef<OsStr>) {
        let value = value.as_ref();
        if value.as_encoded_bytes().starts_with(b"-") {
            let mut joined = OsString::from(format!("{name}="));
            joined.push(value);
            self.args.push(joined);
        } else {
            self.args.extend([OsString::from(name), value.to_owned()]);
        }
    }

    /// `--name value` if there is a value.
    pub fn optional(&mut self, name: &str, value: Option<impl AsRef<OsStr>>) {
        if let Some(value) = value {
            self.option(name, value);
        }
    }

    /// `--name value` for each value, in order.
    pub fn repeated<T: AsRef<OsStr>>(&mut self, name: &str, values: impl IntoIterator<Item = T>) {
        for value in values {
            self.option(name, value);
        }
    }

    /// `--name` if `on`.
    pub fn flag(&mut self, name: &str, on: bool) {
        if on {
            self.args.push(name.into());
        }
    }

    pub fn into_args(self) -> Vec<OsString> {
        self.args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_that_looks_like_an_option_is_joined_to_its_name() {
        let mut line = CommandLine::default();
        line.option("--serial", "abc");
        line.option("--serial", "-x");
        line.optional("--cache", None::<&str>);
        line.repeated("--layer", ["/a", "/b"]);
        line.flag("--read-only", false);
        line.flag("--no-verify", true);
        assert_eq!(
            line.into_args(),
            [
                "--serial",
                "abc",
                "--serial=-x",
                "--layer",
                "/a",
                "--layer",
                "/b",
                "--no-verify"
            ]
        );
    }
}
