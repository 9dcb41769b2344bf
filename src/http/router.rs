//! Routes compiled once into a radix tree (matchit), with per-path methods.

use std::collections::BTreeMap;

/// What a request's method and path lead to.
#[derive(Debug, PartialEq, Eq)]
pub enum Match {
    Found {
        handler: usize,
        params: Vec<(String, String)>,
    },
    /// The path exists, but not for this method; lists the allowed ones.
    MethodNotAllowed(Vec<String>),
    NotFound,
}

#[derive(Clone, Default)]
pub struct Router {
    tree: matchit::Router<usize>,
    paths: Vec<BTreeMap<String, usize>>,
    by_pattern: BTreeMap<String, usize>,
    /// Each handler's route template, by handler index.
    templates: BTreeMap<usize, String>,
}

/// The parameter names of a route template (`{name}`, and a trailing
/// `{*rest}`), in order. Errors for a template that does not start with `/`,
/// or a brace that does not hold a parameter name (`{{` and `}}` stand for
/// literal braces).
pub fn template_params(path: &str) -> Result<Vec<String>, String> {
    if !path.starts_with('/') {
        return Err(format!("route path must start with '/', got {path:?}"));
    }
    let mut names = Vec::new();
    let mut rest = path;
    while let Some(at) = rest.find(['{', '}']) {
        let (brace, after) = (&rest[at..=at], &rest[at + 1..]);
        if after.starts_with(brace) {
            rest = &after[1..]; // an escaped literal brace
            continue;
        }
        let close = match (brace, after.find('}')) {
            ("{", Some(close)) => close,
            _ => return Err(format!("route {path:?} has an unmatched {brace:?}")),
        };
        let name = after[..close].strip_prefix('*').unwrap_or(&after[..close]);
        let ident = name
            .chars()
            .next()
            .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
            && name.chars().all(|c| c == '_' || c.is_ascii_alphanumeric());
        if !ident {
            return Err(format!(
                "route {path:?}: {{{}}} is not a parameter name",
                &after[..close]
            ));
        }
        names.push(name.to_string());
        rest = &after[close + 1..];
    }
    Ok(names)
}

impl Router {
    /// Adds `method path -> handler`. Paths use `{name}` parameters and a
    /// trailing `{*rest}` catch-all.
    pub fn insert(&mut self, method: &str, path: &str, handler: usize) -> Result<(), String> {
        if !path.starts_with('/') {
            return Err(format!("route path must start with '/', got {path:?}"));
        }
        let method = method.to_ascii_uppercase();
        let slot = match self.by_pattern.get(path) {
            Some(&slot) => slot,
            None => {
                let slot = self.paths.len();
                self.tree
                    .insert(path, slot)
                    .map_err(|e| format!("route {path:?} conflicts: {e}"))?;
                self.paths.push(BTreeMap::new());
                self.by_pattern.insert(path.to_string(), slot);
                slot
            }
        };
        if self.paths[slot].insert(method.clone(), handler).is_some() {
            return Err(format!("route {method} {path} is defined twice"));
        }
        self.templates.insert(handler, path.to_string());
        Ok(())
    }

    /// The route template a handler was added with.
    pub fn template(&self, handler: usize) -> Option<&str> {
        self.templates.get(&handler).map(String::as_str)
    }

    /// Finds the route for a request path as received (percent-encoded).
    /// Escapes are decoded before matching, except `%2F`, which stays inside
    /// its segment and becomes `/` only in parameter values.
    pub fn lookup(&self, method: &str, path: &str) -> Match {
        let decoded;
        let path = if path.contains('%') {
            decoded = decode(path, true);
            decoded.as_str()
        } else {
            path
        };
        let Ok(found) = self.tree.at(path) else {
            return Match::NotFound;
        };
        let methods = &self.paths[*found.value];
        let handler = methods
            .get(method)
            .or_else(|| (method == "HEAD").then(|| methods.get("GET")).flatten());
        match handler {
            Some(&handler) => Match::Found {
                handler,
                params: found
                    .params
                    .iter()
                    .map(|(k, v)| (k.to_string(), unescape_slashes(v)))
                    .collect(),
            },
            None => Match::MethodNotAllowed(methods.keys().cloned().collect()),
        }
    }
}

/// Decodes `%XX` escapes; invalid UTF-8 is replaced.
pub fn percent_decode(s: &str) -> String {
    decode(s, false)
}

/// Decodes the `%2F` and `%25` escapes that matching left in place, in one pass.
fn unescape_slashes(s: &str) -> String {
    if !s.contains('%') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let esc = rest.get(at..at + 3).unwrap_or("");
        if esc.eq_ignore_ascii_case("%2F") {
            out.push('/');
            rest = &rest[at + 3..];
        } else if esc == "%25" {
            out.push('%');
            rest = &rest[at + 3..];
        } else {
            out.push('%');
            rest = &rest[at + 1..];
        }
    }
    out.push_str(rest);
    out
}

/// Decodes `%XX` escapes; with `keep_slash`, `%2F` and `%25` stay encoded
/// (so a decoded `%` is never read as the start of another escape).
fn decode(s: &str, keep_slash: bool) -> String {
    if !s.contains('%') {
        return s.to_string();
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(v) = hex
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .filter(|v| !(keep_slash && (*v == b'/' || *v == b'%')))
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_params_read_names_and_refuse_bad_templates() {
        assert_eq!(
            template_params("/a/{id}/b/{*rest}").unwrap(),
            ["id", "rest"]
        );
        assert_eq!(template_params("/{{x}}/{y}").unwrap(), ["y"]);
        assert!(template_params("/plain").unwrap().is_empty());
        for bad in ["no-slash", "/{1x}", "/{}", "/{a", "/a}", "/{a-b}"] {
            assert!(template_params(bad).is_err(), "{bad}");
        }
    }

    fn router() -> Router {
        let mut r = Router::default();
        r.insert("GET", "/", 0).unwrap();
        r.insert("post", "/tasks", 1).unwrap();
        r.insert("GET", "/tasks", 2).unwrap();
        r.insert("GET", "/task-progress/{task_id}", 3).unwrap();
        r.insert("GET", "/files/{*path}", 4).unwrap();
        r
    }

    #[test]
    fn matches_methods_and_params() {
        let r = router();
        assert_eq!(
            r.lookup("GET", "/"),
            Match::Found {
                handler: 0,
                params: vec![]
            }
        );
        assert_eq!(
            r.lookup("POST", "/tasks"),
            Match::Found {
                handler: 1,
                params: vec![]
            }
        );
        assert_eq!(
            r.lookup("GET", "/task-progress/data_1f%20x"),
            Match::Found {
                handler: 3,
                params: vec![("task_id".into(), "data_1f x".into())]
            }
        );
        assert_eq!(
            r.lookup("GET", "/files/a/b.txt"),
            Match::Found {
                handler: 4,
                params: vec![("path".into(), "a/b.txt".into())]
            }
        );
    }

    #[test]
    fn not_found_and_method_not_allowed() {
        let r = router();
        assert_eq!(r.lookup("GET", "/nope"), Match::NotFound);
        assert_eq!(r.lookup("GET", "/task-progress"), Match::NotFound);
        assert_eq!(
            r.lookup("DELETE", "/tasks"),
            Match::MethodNotAllowed(vec!["GET".into(), "POST".into()])
        );
    }

    #[test]
    fn encoded_paths_match_decoded_routes() {
        let mut r = router();
        r.insert("GET", "/café", 7).unwrap();
        r.insert("GET", "/hello world/{name}", 8).unwrap();
        assert!(matches!(
            r.lookup("GET", "/caf%C3%A9"),
            Match::Found { handler: 7, .. }
        ));
        assert!(matches!(
            r.lookup("GET", "/t%61sks"),
            Match::Found { handler: 2, .. }
        ));
        assert_eq!(
            r.lookup("GET", "/hello%20world/a%2Fb"),
            Match::Found {
                handler: 8,
                params: vec![("name".into(), "a/b".into())]
            }
        );
        // An encoded slash does not split a segment.
        assert_eq!(r.lookup("GET", "/tasks%2Fx"), Match::NotFound);
        // An encoded percent sign is decoded once, never twice.
        assert_eq!(
            r.lookup("GET", "/files/a%252Fb%25"),
            Match::Found {
                handler: 4,
                params: vec![("path".into(), "a%2Fb%".into())]
            }
        );
    }

    #[test]
    fn head_falls_back_to_get() {
        let r = router();
        assert!(matches!(
            r.lookup("HEAD", "/"),
            Match::Found { handler: 0, .. }
        ));
    }

    #[test]
    fn rejects_bad_and_duplicate_routes() {
        let mut r = router();
        assert!(r.insert("GET", "tasks", 9).is_err());
        assert!(r.insert("GET", "/tasks", 9).is_err());
        assert!(r.insert("GET", "/task-progress/{other}", 9).is_err());
    }

    #[test]
    fn percent_decoding_is_lenient() {
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%C3%A9"), "é");
    }

    /// Percent-encodes every byte outside the unreserved set, as a client would.
    fn encode(s: &str) -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn lookup_never_panics_on_any_method_or_path(method in ".{0,12}", path in "\\PC{0,80}") {
                let r = router();
                let _ = r.lookup(&method, &path);
                let _ = r.lookup(&method, &format!("/{path}"));
                let _ = percent_decode(&path);
            }

            #[test]
            fn lookup_never_panics_on_escapes(path in "(/|%|[0-9a-fA-F]|%2[fF]|%25|\\PC){0,40}") {
                let r = router();
                let _ = r.lookup("GET", &format!("/task-progress/{path}"));
                let _ = r.lookup("GET", &format!("/files/{path}"));
            }

            #[test]
            fn any_encoded_parameter_value_comes_back_whole(value in "\\PC{1,40}") {
                let r = router();
                let found = r.lookup("GET", &format!("/task-progress/{}", encode(&value)));
                prop_assert_eq!(found, Match::Found {
                    handler: 3,
                    params: vec![("task_id".into(), value.clone())],
                });
            }

            #[test]
            fn catch_all_keeps_every_segment(parts in proptest::collection::vec("\\PC{1,12}", 1..5)) {
                let r = router();
                let path = parts.iter().map(|p| encode(p)).collect::<Vec<_>>().join("/");
                let found = r.lookup("GET", &format!("/files/{path}"));
                prop_assert_eq!(found, Match::Found {
                    handler: 4,
                    params: vec![("path".into(), parts.join("/"))],
                });
            }

            #[test]
            fn percent_decoding_inverts_encoding(value in "\\PC{0,60}") {
                prop_assert_eq!(percent_decode(&encode(&value)), value);
            }
        }
    }
}
