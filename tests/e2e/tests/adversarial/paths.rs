//! 2. Path tricks against per-API permissions, with Envoy's path normalisation off and on.

use keygate_e2e::{demo, CapturedRequest, EnvoyBuilder, Req};

use crate::common::*;

/// The demo standard key may call only `calls` (`/v2/accounts/ACdemo0001/calls` and `.../calls/**`).
fn std_get(target: impl AsRef<[u8]>) -> Req {
    Req::get(target).basic(demo::STANDARD.sid, demo::STANDARD.secret)
}

/// Safety net for every allowed path case: what the upstream received is, canonically, inside the
/// `calls` API of the key's own account.
fn inside_calls(s: &CapturedRequest) {
    let canonical = keygate_core::path::canonicalize(s.path.as_bytes())
        .unwrap_or_else(|| panic!("upstream received a non-canonical path {:?}", s.path));
    let c = canonical.as_str();
    assert!(
        c == CALLS || c.starts_with(&format!("{CALLS}/")),
        "allowed, but the upstream path {:?} is outside calls",
        s.path
    );
}

/// One path trick: the request, and the expected outcome with Envoy's normalisation off / on.
fn path_row(name: &str, req: Req, off: Expect, on: Expect, normalize: bool) -> Case {
    let expect = if normalize { on } else { off };
    let check = matches!(expect, Expect::Allow { .. });
    let c = case(format!("{name} [normalize_path {normalize}]"), req, expect);
    if check {
        c.with_check(inside_calls)
    } else {
        c
    }
}

#[rustfmt::skip]
fn path_cases(normalize: bool) -> Vec<Case> {
    let row = |name: &str, req: Req, off: Expect, on: Expect| path_row(name, req, off, on, normalize);
    let std = demo::STANDARD;
    let ok = |path: &str| allow(std.sid, "standard", "calls", path);
    let bad = || deny(400, "malformed_path");
    let forbidden = || deny(403, "permission_denied");
    let not_found = || deny(404, "unknown_route");
    let envoy_400 = || Expect::Envoy(400);
    let to_keys = "2010-04-01/Accounts/ACdemo0001/Keys.json";
    let ca1 = &format!("{CALLS}/CA0001");
    let in_query = &format!("{CALLS}?x=/../../../../{to_keys}");
    let slash = &format!("{CALLS}/");
    vec![
        row("canonical", std_get(CALLS), ok(CALLS), ok(CALLS)),
        row("sub-resource", std_get(ca1), ok(ca1), ok(ca1)),
        row("dot segments that stay inside", std_get(format!("{CALLS}/../../ACdemo0001/calls")), bad(), ok(CALLS)),
        row("dot segments to Keys", std_get(format!("{CALLS}/../../../../{to_keys}")), bad(), forbidden()),
        row("dot segments to Messages", std_get(format!("{CALLS}/../../../..{MESSAGES}")), bad(), forbidden()),
        row("`%2e%2e` to Keys", std_get(format!("{CALLS}/%2e%2e/%2e%2e/%2e%2e/%2e%2e/{to_keys}")), bad(), forbidden()),
        row("`%2E%2E` to Keys", std_get(format!("{CALLS}/%2E%2E/%2E%2E/%2E%2E/%2E%2E/{to_keys}")), bad(), forbidden()),
        row("`.%2e` to Keys", std_get(format!("{CALLS}/.%2e/.%2e/.%2e/.%2e/{to_keys}")), bad(), forbidden()),
        row("`..%2f` to Keys", std_get(format!("{CALLS}/..%2f..%2f..%2f..%2f{to_keys}")), bad(), bad()),
        row("single dot segment", std_get(format!("{CALLS}/./CA0001")), bad(), ok(ca1)),
        row("`%2e` segment", std_get(format!("{CALLS}/%2e/CA0001")), bad(), ok(ca1)),
        row("leading `//`", std_get(format!("/{CALLS}")), bad(), ok(CALLS)),
        row("inner `//`", std_get("/v2//accounts/ACdemo0001/calls"), bad(), ok(CALLS)),
        row("`//` before a sub-resource", std_get(format!("{CALLS}//CA0001")), bad(), ok(ca1)),
        row("`%2F`", std_get("/v2/accounts/ACdemo0001%2Fcalls"), bad(), bad()),
        row("`%2f`", std_get("/v2/accounts/ACdemo0001%2fcalls"), bad(), bad()),
        row("`%2F` from calls to Keys", std_get(format!("{CALLS}%2F..%2F..%2F..%2F..%2F{to_keys}")), bad(), bad()),
        row("backslash to Keys", std_get(format!("{CALLS}\\..\\..\\..\\..\\{}", to_keys.replace('/', "\\"))), bad(), forbidden()),
        row("backslash dot segments", std_get(format!("{CALLS}\\..\\..\\x")), bad(), not_found()),
        row("`%5C`", std_get(format!("{CALLS}%5C..%5C..%5Cx")), bad(), bad()),
        row("`%5c` to Keys", std_get(format!("{CALLS}/%5c..%5c..%5c..%5c..%5c{to_keys}")), bad(), bad()),
        row("double-encoded dots `%252e`", std_get(format!("{CALLS}/%252e%252e/%252e%252e/%252e%252e/%252e%252e/{to_keys}")), bad(), bad()),
        row("double-encoded slash `%252F`", std_get(format!("{CALLS}%252F..%252F..%252Fx")), bad(), bad()),
        row("encoded NUL `%00`", std_get(format!("{CALLS}/%00")), bad(), envoy_400()),
        row("`;` parameter on the last segment", std_get(format!("{CALLS};x=1")), bad(), bad()),
        row("`;` parameter mid-path", std_get("/v2/accounts/ACdemo0001;x=/calls"), bad(), bad()),
        row("`;` hiding Keys", std_get(format!("/{to_keys};/v2/accounts/ACdemo0001/calls")), bad(), bad()),
        row("`/V2/` upper case", std_get("/V2/accounts/ACdemo0001/calls"), not_found(), not_found()),
        row("`/Calls` capitalised", std_get("/v2/accounts/ACdemo0001/Calls"), not_found(), not_found()),
        row("trailing slash", std_get(slash), ok(slash), ok(slash)),
        row("prefix look-alike `callsX`", std_get(format!("{CALLS}X")), not_found(), not_found()),
        row("prefix look-alike `calls.json`", std_get(format!("{CALLS}.json")), not_found(), not_found()),
        row("prefix look-alike `calls-`", std_get(format!("{CALLS}-/CA0001")), not_found(), not_found()),
        row("encoded unreserved `c%61lls`", std_get("/v2/accounts/ACdemo0001/c%61lls"), ok("/v2/accounts/ACdemo0001/c%61lls"), ok(CALLS)),
        row("encoded account SID `%41Cdemo0001`", std_get("/v2/accounts/%41Cdemo0001/calls"), ok("/v2/accounts/%41Cdemo0001/calls"), ok(CALLS)),
        row("another account's calls", std_get("/v2/accounts/ACdemo0002/calls"), deny(404, "account_mismatch"), deny(404, "account_mismatch")),
        row("Keys with an allowed path in the query", std_get(format!("/{to_keys}?x={CALLS}")), forbidden(), forbidden()),
        row("calls with a traversal in the query", std_get(in_query), ok(in_query), ok(in_query)),
        row("Keys with an allowed path in the fragment", std_get(format!("/{to_keys}#{CALLS}")), envoy_400(), envoy_400()),
        row("calls with a traversal in the fragment", std_get(format!("{CALLS}#/../../../../{to_keys}")), envoy_400(), envoy_400()),
        row("raw control byte", std_get(format!("{CALLS}/\x01")), envoy_400(), envoy_400()),
        row("raw non-ASCII", std_get(b"/v2/accounts/ACdemo0001/calls/\xc3\xa9"), envoy_400(), envoy_400()),
        row("9000-byte path", std_get(format!("{CALLS}/{}", "a".repeat(9000))), bad(), bad()),
        row("absolute-form target", std_get(format!("http://127.0.0.1{CALLS}")), ok(CALLS), ok(CALLS)),
        row("absolute-form target to Keys", std_get(format!("http://127.0.0.1/{to_keys}")), forbidden(), forbidden()),
        row("DELETE, a method calls does not have", Req::delete(CALLS).basic(std.sid, std.secret), not_found(), not_found()),
        row("GET Keys with `X-HTTP-Method-Override: GET`", std_get(format!("/{to_keys}")).header("x-http-method-override", "GET"), forbidden(), forbidden()),
        // keygate judges the real method and forwards override headers unchanged; whether the
        // upstream honours them is the upstream's business (it must judge them itself).
        path_row_override(normalize),
    ]
}

fn path_row_override(n: bool) -> Case {
    let c = path_row(
        "GET calls with `X-HTTP-Method-Override: DELETE`",
        std_get(CALLS)
            .header("x-http-method-override", "DELETE")
            .header("x-http-method", "DELETE")
            .header("x-method-override", "DELETE"),
        allow(demo::STANDARD.sid, "standard", "calls", CALLS),
        allow(demo::STANDARD.sid, "standard", "calls", CALLS),
        n,
    );
    c.with_check(|s| {
        inside_calls(s);
        assert_eq!(s.method, "GET", "the upstream gets the real method");
        for h in [
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
        ] {
            assert_eq!(
                s.header_all(h),
                vec![&b"DELETE"[..]],
                "{h} forwarded unchanged"
            );
        }
    })
}

#[test]
fn path_tricks_with_envoy_normalisation_off_hit_keygates_own_guard() {
    let envoy = EnvoyBuilder::new();
    Bench::run_family(envoy, "path tricks, normalisation off", &path_cases(false));
}

#[test]
fn path_tricks_with_envoy_normalisation_on_stay_safe() {
    let envoy = EnvoyBuilder::new().normalize_path(true).merge_slashes(true);
    Bench::run_family(envoy, "path tricks, normalisation on", &path_cases(true));
}
