//! Reading TOML documents people write (`service.toml`, image files), with errors
//! that name the offending key and line.
//!
//! Documents deserialize into raw serde structs with `deny_unknown_fields`;
//! `serde_path_to_error` records the key path (`health.interval`, `ports[0].protocol`)
//! of whatever failed, and the TOML parser's span gives the line.

use serde::de::DeserializeOwned;

/// A TOML document that could not be read, with the key and line at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {message}", key_part(.key), line_part(.line))]
pub struct TomlError {
    /// The dotted key path of the offending value (`health.interval`), or empty
    /// when the document is not valid TOML at all.
    pub key: String,
    /// The 1-based line of the offending value, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

fn key_part(key: &str) -> String {
    if key.is_empty() {
        "document".to_owned()
    } else {
        format!("key `{key}`")
    }
}

fn line_part(line: &Option<usize>) -> String {
    line.map(|l| format!(" (line {l})")).unwrap_or_default()
}

impl TomlError {
    /// An error about `key` found after parsing, when the value was well-formed TOML
    /// but breaks a rule of the document.
    pub(crate) fn at(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            line: None,
            message: message.into(),
        }
    }
}

/// Parses `text` into `T`, naming the key path of any failure.
pub(crate) fn parse<T: DeserializeOwned>(text: &str) -> Result<T, TomlError> {
    let de = toml::Deserializer::parse(text).map_err(|e| from_toml(text, String::new(), &e))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = match e.path().to_string() {
            root if root == "." => String::new(),
            key => key,
        };
        from_toml(text, key, e.inner())
    })
}

fn from_toml(text: &str, key: String, e: &toml::de::Error) -> TomlError {
    let line = e
        .span()
        .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
    TomlError {
        key,
        line,
        message: e.message().trim().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        a: Inner,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        n: u16,
    }

    #[test]
    fn names_key_and_line() {
        let e = parse::<Doc>("[a]\nn = 70000\n").unwrap_err();
        assert_eq!(e.key, "a.n");
        assert_eq!(e.line, Some(2));
        assert!(e.to_string().starts_with("key `a.n` (line 2): "), "{e}");

        let e = parse::<Doc>("[a]\nn = 1\nm = 2\n").unwrap_err();
        assert!(e.message.contains("unknown field `m`"), "{e}");
        assert_eq!(e.line, Some(3));

        let e = parse::<Doc>("[a\n").unwrap_err();
        assert_eq!(e.key, "");
        assert!(e.to_string().starts_with("document (line 1)"), "{e}");
    }
}
