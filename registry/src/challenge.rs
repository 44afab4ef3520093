//! `WWW-Authenticate` challenges (RFC 7235) as registries send them.

use std::collections::BTreeMap;

/// One challenge: its scheme (`Bearer`, `Basic`) and parameters (`realm`,
/// `service`, `scope`), parameter names lowercased.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: BTreeMap<String, String>,
}

impl Challenge {
    /// Parses a header value holding one challenge; `None` when it is not one.
    pub fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
        if scheme.is_empty()
            || !scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return None;
        }
        let mut params = BTreeMap::new();
        let mut s = rest.trim_start();
        while !s.is_empty() {
            let (name, after) = s.split_once('=')?;
            let name = name.trim().to_ascii_lowercase();
            if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == ',') {
                return None;
            }
            let after = after.trim_start();
            let (value, rest) = if let Some(quoted) = after.strip_prefix('"') {
                let mut value = String::new();
                let mut chars = quoted.char_indices();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => value.push(chars.next()?.1),
                        '"' => {
                            end = Some(i + 1);
                            break;
                        }
                        c => value.push(c),
                    }
                }
                (value, &quoted[end?..])
            } else {
                let end = after.find(',').unwrap_or(after.len());
                (after[..end].trim().to_string(), &after[end..])
            };
            params.insert(name, value);
            let rest = rest.trim_start();
            s = match rest.strip_prefix(',') {
                Some(r) => r.trim_start(),
                None if rest.is_empty() => rest,
                None => return None,
            };
        }
        Some(Challenge {
            scheme: scheme.to_string(),
            params,
        })
    }

    /// Whether this is a challenge of `scheme` (case-insensitive).
    pub fn is(&self, scheme: &str) -> bool {
        self.scheme.eq_ignore_ascii_case(scheme)
    }

    /// A parameter's value.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_with_quoted_comma() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:os/image:pull,push""#,
        )
        .expect("challenge");
        assert!(c.is("bearer"));
        assert_eq!(c.param("realm"), Some("https://auth.example.com/token"));
        assert_eq!(c.param("service"), Some("registry.example.com"));
        assert_eq!(c.param("scope"), Some("repository:os/image:pull,push"));
    }

    #[test]
    fn basic_and_garbage() {
        let c = Challenge::parse(r#"Basic realm="Registry Realm""#).expect("challenge");
        assert!(c.is("Basic"));
        assert_eq!(c.param("realm"), Some("Registry Realm"));
        assert_eq!(Challenge::parse(r#"Bearer realm="unterminated"#), None);
        assert_eq!(Challenge::parse("Bearer realm"), None);
        assert_eq!(Challenge::parse(r#"Bearer a="b" c="d""#), None);
        let c = Challenge::parse(r#"Bearer realm=x, scope="a\"b""#).expect("challenge");
        assert_eq!(c.param("realm"), Some("x"));
        assert_eq!(c.param("scope"), Some("a\"b"));
    }
}
