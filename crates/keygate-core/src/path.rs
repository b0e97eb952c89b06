//! Path canonicalisation and API path templates.
//!
//! Permissions are decided on a canonical path. Anything that could make keygate and the upstream
//! disagree about which resource a path names is refused before matching, instead of being
//! "fixed up": dot segments (also percent-encoded), doubled slashes, encoded slashes and
//! backslashes, `%25` (double encoding), `;` parameters, control and non-ASCII bytes, fragments.
//! Percent-encoded unreserved characters are decoded and other escapes upper-cased, so every
//! accepted path has exactly one canonical form, and the canonical form is a fixed point.
//!
//! Templates are `/`-separated segments: a literal, a segment with one `{name}` placeholder and
//! optional literal prefix and suffix (`{sid}.json`), or a final `**` matching zero or more
//! further segments. The placeholder `{account_sid}` binds the request to the key's account.

/// Longest `:path` (query included) considered.
pub const MAX_PATH_LEN: usize = 8192;

/// A canonical path: starts with `/`, no trailing slash (except the root), no empty segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalPath(String);

impl CanonicalPath {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Segments without the leading slash; the root has none.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0[1..].split('/').filter(|s| !s.is_empty())
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Characters allowed literally in a path segment (RFC 3986 pchar minus `;` and `%`).
fn is_plain_pchar(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@'
        )
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// Canonicalises a raw `:path` (query ignored). `None` means the path is refused.
pub fn canonicalize(raw: &[u8]) -> Option<CanonicalPath> {
    if raw.len() > MAX_PATH_LEN {
        return None;
    }
    let path = match raw.iter().position(|&b| b == b'?') {
        Some(q) => &raw[..q],
        None => raw,
    };
    if path.first() != Some(&b'/') {
        return None;
    }
    let mut out = String::with_capacity(path.len());
    for seg in path[1..].split(|&b| b == b'/') {
        let start = out.len();
        out.push('/');
        let mut i = 0;
        while i < seg.len() {
            let b = seg[i];
            if b == b'%' {
                let hi = seg.get(i + 1).copied().and_then(hex_val)?;
                let lo = seg.get(i + 2).copied().and_then(hex_val)?;
                let decoded = hi << 4 | lo;
                if is_unreserved(decoded) {
                    out.push(char::from(decoded));
                } else if (decoded.is_ascii_graphic() || decoded == b' ')
                    && !matches!(decoded, b'/' | b'\\' | b'%' | b';' | b'?' | b'#')
                {
                    out.push('%');
                    out.push(char::from(HEX_UPPER[usize::from(hi)]));
                    out.push(char::from(HEX_UPPER[usize::from(lo)]));
                } else {
                    return None;
                }
                i += 3;
            } else if is_plain_pchar(b) {
                out.push(char::from(b));
                i += 1;
            } else {
                return None;
            }
        }
        let text = &out[start + 1..];
        if text == "." || text == ".." {
            return None;
        }
        if text.is_empty() {
            // Only the very last segment may be empty (a trailing slash, dropped).
            out.truncate(start);
        }
    }
    // An empty segment anywhere but the end means `//`.
    let seg_count = path[1..].split(|&b| b == b'/').count();
    let empty_inner = path[1..]
        .split(|&b| b == b'/')
        .take(seg_count.saturating_sub(1))
        .any(|s| s.is_empty());
    if empty_inner {
        return None;
    }
    if out.is_empty() {
        out.push('/');
    }
    Some(CanonicalPath(out))
}

/// One compiled template segment.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    /// `prefix{name}suffix`; matches when the request segment has the prefix and suffix and a
    /// non-empty middle.
    Param {
        prefix: Box<str>,
        suffix: Box<str>,
        account: bool,
    },
}

/// A compiled path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    segments: Vec<Segment>,
    /// Ends in `/**`.
    rest: bool,
}

/// What matching a template against a path found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateMatch<'p> {
    No,
    /// Matched; carries the `{account_sid}` value if the template has one.
    Yes {
        account_sid: Option<&'p str>,
    },
}

impl Template {
    /// Compiles a template; the error says what is wrong with it.
    pub fn parse(t: &str) -> Result<Template, String> {
        if !t.starts_with('/') {
            return Err("must start with '/'".to_owned());
        }
        let raw: Vec<&str> = if t == "/" {
            Vec::new()
        } else {
            t[1..].split('/').collect()
        };
        let mut segments = Vec::with_capacity(raw.len());
        let mut rest = false;
        let mut has_account = false;
        for (i, seg) in raw.iter().enumerate() {
            if *seg == "**" {
                if i + 1 != raw.len() {
                    return Err("'**' may only be the last segment".to_owned());
                }
                rest = true;
                continue;
            }
            if seg.is_empty() {
                return Err("empty segment (doubled or trailing '/')".to_owned());
            }
            match (seg.find('{'), seg.find('}')) {
                (None, None) => {
                    let canon = canonicalize(format!("/{seg}").as_bytes())
                        .filter(|c| &c.as_str()[1..] == *seg)
                        .ok_or_else(|| format!("segment {seg:?} is not in canonical form"))?;
                    segments.push(Segment::Literal(canon.as_str()[1..].into()));
                }
                (Some(open), Some(close)) if open < close => {
                    let (prefix, name, suffix) =
                        (&seg[..open], &seg[open + 1..close], &seg[close + 1..]);
                    if prefix.contains(['{', '}']) || suffix.contains(['{', '}']) {
                        return Err(format!("segment {seg:?} has more than one placeholder"));
                    }
                    if name.is_empty()
                        || !name
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                    {
                        return Err(format!(
                            "placeholder name {name:?} must be lowercase letters, digits and '_'"
                        ));
                    }
                    for lit in [prefix, suffix] {
                        if !lit.bytes().all(is_plain_pchar) {
                            return Err(format!("segment {seg:?} has characters outside the canonical path alphabet"));
                        }
                    }
                    let account = name == "account_sid";
                    if account {
                        if has_account {
                            return Err("{account_sid} appears more than once".to_owned());
                        }
                        has_account = true;
                    }
                    segments.push(Segment::Param {
                        prefix: prefix.into(),
                        suffix: suffix.into(),
                        account,
                    });
                }
                _ => return Err(format!("segment {seg:?} has unbalanced braces")),
            }
        }
        Ok(Template { segments, rest })
    }

    /// Matches a canonical path.
    pub fn matches<'p>(&self, path: &'p CanonicalPath) -> TemplateMatch<'p> {
        let mut account_sid = None;
        let mut segs = path.segments();
        for want in &self.segments {
            let Some(got) = segs.next() else {
                return TemplateMatch::No;
            };
            match want {
                Segment::Literal(l) => {
                    if **l != *got {
                        return TemplateMatch::No;
                    }
                }
                Segment::Param {
                    prefix,
                    suffix,
                    account,
                } => {
                    if got.len() <= prefix.len() + suffix.len()
                        || !got.starts_with(&**prefix)
                        || !got.ends_with(&**suffix)
                    {
                        return TemplateMatch::No;
                    }
                    if *account {
                        account_sid = Some(&got[prefix.len()..got.len() - suffix.len()]);
                    }
                }
            }
        }
        if !self.rest && segs.next().is_some() {
            return TemplateMatch::No;
        }
        TemplateMatch::Yes { account_sid }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn canon(s: &str) -> Option<String> {
        canonicalize(s.as_bytes()).map(|c| c.as_str().to_owned())
    }

    #[test]
    fn accepted_paths_and_their_canonical_form() {
        let cases = [
            ("/", "/"),
            ("/v2/accounts/AC1/calls", "/v2/accounts/AC1/calls"),
            ("/v2/accounts/AC1/calls/", "/v2/accounts/AC1/calls"),
            ("/v2/accounts/AC1/calls?limit=1", "/v2/accounts/AC1/calls"),
            (
                "/v2/accounts/AC1/calls?x=/../keys",
                "/v2/accounts/AC1/calls",
            ),
            ("/v2/%61ccounts/AC1", "/v2/accounts/AC1"),
            ("/a/%7e%2D", "/a/~-"),
            ("/a/b%20c", "/a/b%20c"),
            ("/a/b%3a", "/a/b%3A"),
            ("/a/b:c@d", "/a/b:c@d"),
            ("/a/...", "/a/..."),
            ("/a/.well-known", "/a/.well-known"),
        ];
        for (raw, want) in cases {
            assert_eq!(canon(raw).as_deref(), Some(want), "{raw}");
        }
    }

    #[test]
    fn refused_paths() {
        let cases = [
            "",
            "*",
            "v2/accounts",
            "//v2",
            "/v2//accounts",
            "/v2/./accounts",
            "/v2/../keys",
            "/v2/accounts/..",
            "/v2/%2e%2e/keys",
            "/v2/%2E/x",
            "/v2/.%2e/x",
            "/a%2fb",
            "/a%2Fb",
            "/a%5cb",
            "/a\\b",
            "/a%252e%252e",
            "/a;b",
            "/a%3bb",
            "/a/b#frag",
            "/a%23b",
            "/a%3F",
            "/a%00",
            "/a%1f",
            "/a%7f",
            "/a\x00",
            "/a b",
            "/a\tb",
            "/caf\u{e9}",
            "/a%c3%a9",
            "/a%",
            "/a%4",
            "/a%zz",
            "/a\"b",
            "/a<b",
            "/a|b",
            "/a^b",
            "/a`b",
            "/a{b}",
        ];
        for raw in cases {
            assert_eq!(canon(raw), None, "{raw:?} should be refused");
        }
        assert_eq!(canonicalize(b"/a\xff"), None);
        assert_eq!(canonicalize(&[b'/'; MAX_PATH_LEN + 1]), None);
    }

    #[test]
    fn canonical_form_is_a_fixed_point() {
        for raw in ["/v2/%61ccounts/AC1/", "/a/b%3a%20", "/x/%7E", "/"] {
            let once = canon(raw).unwrap();
            assert_eq!(canon(&once).as_deref(), Some(once.as_str()), "{raw}");
        }
    }

    fn m(t: &str, p: &str) -> TemplateMatch<'static> {
        let t = Template::parse(t).unwrap();
        let p: &'static CanonicalPath = Box::leak(Box::new(canonicalize(p.as_bytes()).unwrap()));
        t.matches(p)
    }

    #[test]
    fn templates_match_on_segment_boundaries() {
        let yes = |a: Option<&'static str>| TemplateMatch::Yes { account_sid: a };
        assert_eq!(
            m("/v2/accounts/{account_sid}/calls", "/v2/accounts/AC1/calls"),
            yes(Some("AC1"))
        );
        assert_eq!(
            m(
                "/v2/accounts/{account_sid}/calls",
                "/v2/accounts/AC1/callsx"
            ),
            TemplateMatch::No
        );
        assert_eq!(
            m(
                "/v2/accounts/{account_sid}/calls",
                "/v2/accounts/AC1/calls/CA1"
            ),
            TemplateMatch::No
        );
        assert_eq!(
            m(
                "/v2/accounts/{account_sid}/calls/**",
                "/v2/accounts/AC1/calls/CA1/x"
            ),
            yes(Some("AC1"))
        );
        assert_eq!(
            m(
                "/v2/accounts/{account_sid}/calls/**",
                "/v2/accounts/AC1/calls"
            ),
            yes(Some("AC1"))
        );
        assert_eq!(
            m(
                "/v2/accounts/{account_sid}/calls/**",
                "/v2/accounts/AC1/callsx"
            ),
            TemplateMatch::No
        );
        assert_eq!(
            m("/v2/accounts/{account_sid}", "/v2/accounts"),
            TemplateMatch::No
        );
        assert_eq!(
            m(
                "/2010-04-01/Accounts/{account_sid}/Keys/{key_sid}.json",
                "/2010-04-01/Accounts/AC9/Keys/SK1.json"
            ),
            yes(Some("AC9"))
        );
        assert_eq!(
            m(
                "/2010-04-01/Accounts/{account_sid}/Keys/{key_sid}.json",
                "/2010-04-01/Accounts/AC9/Keys/.json"
            ),
            TemplateMatch::No
        );
        assert_eq!(
            m(
                "/2010-04-01/Accounts/{account_sid}/Keys.json",
                "/2010-04-01/Accounts/AC9/Keys.jsonx"
            ),
            TemplateMatch::No
        );
        assert_eq!(m("/api/account/balance", "/api/account/balance"), yes(None));
        assert_eq!(
            m("/api/account/balance", "/api/Account/balance"),
            TemplateMatch::No
        );
        assert_eq!(m("/", "/"), yes(None));
        assert_eq!(m("/**", "/anything/at/all"), yes(None));
    }

    #[test]
    fn bad_templates_say_why() {
        let cases = [
            ("v2/x", "must start with '/'"),
            ("/v2//x", "empty segment (doubled or trailing '/')"),
            ("/v2/x/", "empty segment (doubled or trailing '/')"),
            ("/**/x", "'**' may only be the last segment"),
            (
                "/{a}{b}",
                "segment \"{a}{b}\" has more than one placeholder",
            ),
            (
                "/{Account}",
                "placeholder name \"Account\" must be lowercase letters, digits and '_'",
            ),
            (
                "/{account_sid}/{account_sid}",
                "{account_sid} appears more than once",
            ),
            ("/a}b{", "segment \"a}b{\" has unbalanced braces"),
            ("/a%2fb", "segment \"a%2fb\" is not in canonical form"),
            ("/..", "segment \"..\" is not in canonical form"),
        ];
        for (t, want) in cases {
            assert_eq!(Template::parse(t).unwrap_err(), want, "{t}");
        }
    }
}
