//! Daemon configuration in layers: a TOML file (`--config FILE`), environment
//! variables `ZTNA_<KEY>`, flags `--<key>`. A flag beats the environment, which beats
//! the file, which beats the built-in default. Each daemon's settings are one struct
//! that is both the flags (clap) and the file (serde); every field is optional or a
//! list, and [`Layered::over`] stacks two of them.
//!
//! File keys are the flags' names with `_` for `-` (`idle_timeout_secs = 30`); lists
//! are TOML arrays. Unknown keys are errors. A bad value is one line naming the file,
//! the key, the line and why: `config file /etc/ztna/intermediate.toml: key
//! idle_timeout_secs (line 3): invalid type: string "x", expected u64`.

use std::path::Path;

use serde::de::DeserializeOwned;

/// One layer's value of a setting: the higher layer wins where it has one.
pub trait Layer {
    fn or_lower(self, lower: Self) -> Self;
}

impl<T> Layer for Option<T> {
    fn or_lower(self, lower: Self) -> Self {
        self.or(lower)
    }
}

/// A list given on a higher layer replaces the lower one's whole.
impl<T> Layer for Vec<T> {
    fn or_lower(self, lower: Self) -> Self {
        if self.is_empty() { lower } else { self }
    }
}

/// Settings that stack: `flags.over(env_and_file)`.
pub trait Layered: Sized {
    fn over(self, lower: Self) -> Self;
}

/// Implements [`Layered`] for a settings struct from its field names.
#[macro_export]
macro_rules! layered {
    ($name:ident { $($field:ident),* $(,)? }) => {
        impl $crate::config::Layered for $name {
            fn over(self, lower: Self) -> Self {
                Self { $($field: $crate::config::Layer::or_lower(self.$field, lower.$field),)* }
            }
        }
    };
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The OS's reason (no such file, permission denied, ...).
    #[error("config file {path}: {reason}")]
    Read {
        path: String,
        /// Not a `source`: it is the message, and printing it twice helps nobody.
        reason: std::io::Error,
    },
    #[error("config file {path}: {location}{why}")]
    Invalid {
        path: String,
        /// `key K (line N): `, `line N: ` or empty.
        location: String,
        why: String,
    },
    #[error("{what} is required: --{flag}, {env}, or `{key}` in the config file")]
    Missing {
        what: &'static str,
        flag: &'static str,
        env: &'static str,
        key: &'static str,
    },
    #[error(
        "{what} must be {min} to {max}, not {value} (--{flag}, {env}, or `{key}` in the config file)"
    )]
    OutOfRange {
        what: &'static str,
        flag: &'static str,
        env: &'static str,
        key: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
}

/// Reads and parses a daemon's TOML file.
pub fn load_file<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|reason| ConfigError::Read {
        path: path.display().to_string(),
        reason,
    })?;
    parse(&text, path)
}

/// Parses TOML text as `T`; `path` names it in errors.
pub fn parse<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    let invalid = |location: String, why: &str| ConfigError::Invalid {
        path: path.display().to_string(),
        location,
        why: why.lines().next().unwrap_or("").to_string(),
    };
    let de = toml::Deserializer::parse(text)
        .map_err(|e| invalid(line_of(text, e.span()), e.message()))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let line = line_of(text, e.inner().span());
        let location = if key == "." || key.is_empty() {
            line
        } else {
            let line = line.trim_end_matches(": ");
            if line.is_empty() {
                format!("key {key}: ")
            } else {
                format!("key {key} ({line}): ")
            }
        };
        invalid(location, e.inner().message())
    })
}

fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(s) => {
            let n = text[..s.start.min(text.len())].matches('\n').count() + 1;
            format!("line {n}: ")
        }
        None => String::new(),
    }
}

/// The file layer of a daemon's settings: parsed from `path`, or empty.
pub fn file_layer<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, ConfigError> {
    match path {
        Some(p) => load_file(p),
        None => Ok(T::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Default, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct S {
        listen: Option<std::net::SocketAddr>,
        idle_timeout_secs: Option<u64>,
        #[serde(default)]
        iface: Vec<String>,
        retry: Option<bool>,
    }
    layered!(S {
        listen,
        idle_timeout_secs,
        iface,
        retry
    });

    fn err(text: &str) -> String {
        parse::<S>(text, Path::new("/etc/ztna/x.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_the_file_the_key_the_line_and_why_on_one_line() {
        assert_eq!(
            err("listen = \"0.0.0.0:1\"\n\nidle_timeout_secs = \"x\"\n"),
            "config file /etc/ztna/x.toml: key idle_timeout_secs (line 3): invalid type: string \"x\", expected u64"
        );
        let e = err("listen = \"nowhere\"");
        assert!(
            e.starts_with("config file /etc/ztna/x.toml: key listen (line 1): "),
            "{e}"
        );
        let e = err("listne = \"0.0.0.0:1\"");
        assert!(e.contains("unknown field `listne`"), "{e}");
        assert!(e.contains("line 1"), "{e}");
        let e = err("listen = ");
        assert!(
            e.starts_with("config file /etc/ztna/x.toml: line 1: "),
            "{e}"
        );
        for e in [err("retry = 1"), err("iface = \"eth0\"")] {
            assert!(!e.contains('\n'), "one line: {e}");
        }
        let e = load_file::<S>(Path::new("/nonexistent/ztna.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "config file /nonexistent/ztna.toml: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn higher_layers_win_and_lists_replace_whole() {
        let file: S = parse(
            "listen = \"0.0.0.0:1\"\nidle_timeout_secs = 5\niface = [\"a\", \"b\"]",
            Path::new("f"),
        )
        .unwrap();
        let flags = S {
            idle_timeout_secs: Some(9),
            iface: vec!["c".into()],
            ..S::default()
        };
        let s = flags.over(file);
        assert_eq!(s.listen, Some("0.0.0.0:1".parse().unwrap()));
        assert_eq!(s.idle_timeout_secs, Some(9));
        assert_eq!(s.iface, vec!["c".to_string()]);
        assert_eq!(s.retry, None);
    }
}
