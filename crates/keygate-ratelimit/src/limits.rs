//! The limits in force: the Limitador server's limits file (a YAML list of `namespace`,
//! `max_value`, `seconds`, `conditions`, `variables`, `name`), as the control plane exports it
//! (`GET /v1/edge/ratelimit-config?format=limitador`) or as a user writes it (`--limits FILE`).
//!
//! Parse, check, then swap: a document is read whole into [`LimitSet`] (limitador's own
//! `Limit`, `Predicate` and `Expression` types; errors carry the path, `[2].seconds: ...`) and
//! only a set that passed every check replaces the one in force.
//!
//! A request's descriptor is matched on its own: its entries are bound as `descriptors[0]` (a
//! map from entry key to value), the one name conditions and variables may use, so the
//! export's `descriptors[0]['keygate'] == 'account'` and `descriptors[0]['account_sid']` read
//! each descriptor of a request in turn. Every limit of the request's domain (its namespace)
//! whose conditions all hold and whose variables all resolve applies to that descriptor; each
//! gives one counter (limitador's: the limit plus the variables' values).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use limitador::counter::Counter;
use limitador::limit::{Context, Expression, Limit, Predicate};
use serde::Deserialize;

/// The longest window a limit may have: 366 days. (A reservation's lifetime is its window, in
/// milliseconds; this keeps it far inside the range limitador and Redis compute with.)
pub const MAX_WINDOW_S: u64 = 366 * 86_400;

/// The one variable conditions and variables may name: the descriptor being matched.
pub const DESCRIPTORS: &str = "descriptors";

/// One limit as written in the file (limitador's fields; `conditions` and `variables` may be
/// left out when empty).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitDoc {
    namespace: String,
    max_value: u64,
    seconds: u64,
    #[serde(default)]
    conditions: Vec<String>,
    #[serde(default)]
    variables: Vec<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    id: Option<String>,
}

#[derive(Debug)]
struct CompiledLimit {
    limit: Arc<Limit>,
    conditions: Vec<Predicate>,
    /// Where it was in the file, for errors at request time.
    index: usize,
}

/// A checked set of limits, grouped by namespace (the rate-limit domain).
#[derive(Debug, Default)]
pub struct LimitSet {
    by_namespace: HashMap<String, Vec<CompiledLimit>>,
    len: usize,
}

impl LimitSet {
    /// Parses and checks a limits file. Errors name the limit by its index in the list and the
    /// field: `[1].seconds: 0: a window must be 1 to 31622400 seconds`.
    pub fn parse(yaml: &str) -> Result<LimitSet, String> {
        let docs: Vec<LimitDoc> = if yaml.trim().is_empty() {
            Vec::new()
        } else {
            // YAML syntax first (errors with line and column), then the shape (errors with a path).
            let value: serde_yaml::Value =
                serde_yaml::from_str(yaml).map_err(|e| format!("not YAML: {e}"))?;
            serde_path_to_error::deserialize(value).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                if path == "." {
                    inner.to_string()
                } else {
                    format!("{path}: {inner}")
                }
            })?
        };
        let mut set = LimitSet::default();
        let mut seen: HashMap<Limit, usize> = HashMap::new();
        for (i, doc) in docs.into_iter().enumerate() {
            let compiled = compile(i, doc)?;
            if let Some(first) = seen.insert((*compiled.limit).clone(), i) {
                return Err(format!(
                    "[{i}]: the same limit as [{first}] (namespace, seconds, conditions and \
                     variables): limitador would count both in one counter"
                ));
            }
            set.by_namespace
                .entry(compiled.limit.namespace().as_ref().to_string())
                .or_default()
                .push(compiled);
            set.len += 1;
        }
        Ok(set)
    }

    /// How many limits the set holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the set holds no limit.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The counters of every limit in `domain` that applies to one descriptor (its entries as
    /// `(key, value)`, a later duplicate key winning). An error names a limit whose condition
    /// or variable could not be evaluated on this descriptor.
    pub fn counters<'a>(
        &self,
        domain: &str,
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Vec<Counter>, String> {
        let Some(limits) = self.by_namespace.get(domain) else {
            return Ok(Vec::new());
        };
        let map: HashMap<String, String> = entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut ctx = Context::default();
        ctx.list_binding(DESCRIPTORS.to_string(), vec![map]);
        let mut counters = Vec::new();
        'limits: for compiled in limits {
            for predicate in &compiled.conditions {
                match predicate.test(&ctx) {
                    Ok(true) => {}
                    Ok(false) => continue 'limits,
                    Err(e) => {
                        return Err(format!(
                            "limit [{}]: condition {:?}: {e}",
                            compiled.index,
                            String::from(predicate.clone())
                        ))
                    }
                }
            }
            match Counter::new(Arc::clone(&compiled.limit), &ctx) {
                Ok(Some(counter)) => counters.push(counter),
                Ok(None) => {}
                Err(e) => return Err(format!("limit [{}]: {e}", compiled.index)),
            }
        }
        Ok(counters)
    }
}

fn compile(i: usize, doc: LimitDoc) -> Result<CompiledLimit, String> {
    if doc.namespace.is_empty() {
        return Err(format!(
            "[{i}].namespace: empty: name the rate-limit domain (keygate's is \"keygate\")"
        ));
    }
    if !(1..=MAX_WINDOW_S).contains(&doc.seconds) {
        return Err(format!(
            "[{i}].seconds: {}: a window must be 1 to {MAX_WINDOW_S} seconds",
            doc.seconds
        ));
    }
    if doc.max_value > u64::from(u32::MAX) {
        return Err(format!(
            "[{i}].max_value: {}: at most {} (Envoy's protocol counts in 32 bits)",
            doc.max_value,
            u32::MAX
        ));
    }
    let mut conditions = Vec::with_capacity(doc.conditions.len());
    for (j, source) in doc.conditions.iter().enumerate() {
        let at = format!("[{i}].conditions[{j}]");
        check_names(&at, source)?;
        conditions.push(Predicate::parse(source).map_err(|e| format!("{at}: {}", first_line(&e)))?);
    }
    let mut variables = Vec::with_capacity(doc.variables.len());
    for (j, source) in doc.variables.iter().enumerate() {
        let at = format!("[{i}].variables[{j}]");
        check_names(&at, source)?;
        variables.push(Expression::parse(source).map_err(|e| format!("{at}: {}", first_line(&e)))?);
    }
    let mut limit = match doc.id {
        Some(id) => Limit::with_id(
            id,
            doc.namespace,
            doc.max_value,
            doc.seconds,
            conditions.clone(),
            variables,
        ),
        None => Limit::new(
            doc.namespace,
            doc.max_value,
            doc.seconds,
            conditions.clone(),
            variables,
        ),
    };
    if let Some(name) = doc.name {
        limit.set_name(name);
    }
    Ok(CompiledLimit {
        limit: Arc::new(limit),
        conditions,
        index: i,
    })
}

/// A CEL parse error's first line (the rest draws a caret under the source).
fn first_line(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// Refuses an expression that names anything but `descriptors`: nothing else is bound, so such
/// a limit could never apply (or, for `limit`, would fail on every request).
fn check_names(at: &str, source: &str) -> Result<(), String> {
    let expression = Expression::parse(source).map_err(|e| format!("{at}: {}", first_line(&e)))?;
    let unknown: HashSet<String> = expression
        .variables()
        .into_iter()
        .filter(|name| name != DESCRIPTORS)
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    let mut unknown: Vec<String> = unknown.into_iter().collect();
    unknown.sort();
    Err(format!(
        "{at}: {source:?} names {}: only `descriptors` is bound (descriptors[0] is the descriptor \
         being matched)",
        unknown.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const ACCOUNT: &str = r#"
- namespace: keygate
  max_value: 60
  seconds: 60
  name: account default
  conditions:
    - "descriptors[0]['keygate'] == 'account'"
    - "descriptors[0]['account_sid'] != 'AC2'"
  variables:
    - "descriptors[0]['account_sid']"
- namespace: keygate
  max_value: 5
  seconds: 60
  conditions:
    - "descriptors[0]['keygate'] == 'account'"
    - "descriptors[0]['account_sid'] == 'AC2'"
  variables:
    - "descriptors[0]['account_sid']"
"#;

    fn maxes(set: &LimitSet, entries: &[(&str, &str)]) -> Vec<u64> {
        let mut found: Vec<u64> = set
            .counters("keygate", entries.iter().copied())
            .unwrap()
            .iter()
            .map(Counter::max_value)
            .collect();
        found.sort();
        found
    }

    #[test]
    fn each_descriptor_is_descriptors_0_and_only_matching_limits_count_it() {
        let set = LimitSet::parse(ACCOUNT).unwrap();
        assert_eq!(set.len(), 2);
        let ac1 = [("keygate", "account"), ("account_sid", "AC1")];
        let ac2 = [("keygate", "account"), ("account_sid", "AC2")];
        assert_eq!(maxes(&set, &ac1), vec![60]);
        assert_eq!(maxes(&set, &ac2), vec![5]);
        // Another kind, a missing variable, another domain: nothing applies.
        assert!(maxes(&set, &[("keygate", "key"), ("key_sid", "SK1")]).is_empty());
        assert!(maxes(&set, &[("keygate", "account")]).is_empty());
        assert!(set.counters("other", ac1).unwrap().is_empty());
    }

    #[test]
    fn an_empty_file_is_no_limit() {
        assert!(LimitSet::parse("").unwrap().is_empty());
        assert!(LimitSet::parse("[]\n").unwrap().is_empty());
    }

    #[test]
    fn bad_documents_are_refused_with_the_path() {
        let cases = [
            ("- 1\n", "[0]: invalid type: integer `1`, expected struct LimitDoc"),
            (
                "- namespace: keygate\n  seconds: 60\n",
                "[0]: missing field `max_value`",
            ),
            (
                "- namespace: keygate\n  max_value: 1\n  seconds: 0\n",
                "[0].seconds: 0: a window must be 1 to 31622400 seconds",
            ),
            (
                "- namespace: keygate\n  max_value: 1\n  seconds: 31622401\n",
                "[0].seconds: 31622401: a window must be 1 to 31622400 seconds",
            ),
            (
                "- namespace: keygate\n  max_value: 4294967296\n  seconds: 1\n",
                "[0].max_value: 4294967296: at most 4294967295 (Envoy's protocol counts in 32 bits)",
            ),
            (
                "- namespace: ''\n  max_value: 1\n  seconds: 1\n",
                "[0].namespace: empty: name the rate-limit domain (keygate's is \"keygate\")",
            ),
            (
                "- namespace: k\n  max_value: 1\n  seconds: 1\n  max_vaule: 2\n",
                "[0].max_vaule: unknown field `max_vaule`, expected one of `namespace`, `max_value`, \
                 `seconds`, `conditions`, `variables`, `name`, `id`",
            ),
            (
                "- namespace: k\n  max_value: 1\n  seconds: 1\n  conditions: [\"req.method == 'GET'\"]\n",
                "[0].conditions[0]: \"req.method == 'GET'\" names req: only `descriptors` is bound \
                 (descriptors[0] is the descriptor being matched)",
            ),
            (
                "- namespace: k\n  max_value: 1\n  seconds: 1\n- namespace: k\n  max_value: 2\n  seconds: 1\n",
                "[1]: the same limit as [0] (namespace, seconds, conditions and variables): \
                 limitador would count both in one counter",
            ),
        ];
        for (yaml, want) in cases {
            assert_eq!(LimitSet::parse(yaml).unwrap_err(), want, "{yaml}");
        }
        assert_eq!(
            LimitSet::parse("- namespace: [\n").unwrap_err(),
            "not YAML: did not find expected node content at line 2 column 1, while parsing a flow node"
        );
        assert_eq!(
            LimitSet::parse("namespace: k\n").unwrap_err(),
            "invalid type: map, expected a sequence"
        );
        let e = LimitSet::parse(
            "- namespace: k\n  max_value: 1\n  seconds: 1\n  variables: [\"descriptors[0][\"]\n",
        )
        .unwrap_err();
        assert!(e.starts_with("[0].variables[0]: "), "{e}");
    }
}
