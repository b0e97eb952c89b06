"""Deterministic key sets and Envoy bootstraps for `make bench`.

Key i (0-based) of every set:
  key SID     SK + 32 hex digits of i
  account SID AC + 32 hex digits of i // 10   (ten keys per account)
  secret      sk_live_ + first 32 hex digits of sha256("keygate-bench:<i>")

Key 0 is the one the load generator uses. In keygate configs it carries the full pipeline: role
`standard` restricted to the `calls` API, an IP allowlist of 127.0.0.1/32, a key rate, a key x API
rate, an account rate and account concurrency, and the filter-wide failed-auth limiter, all set
so high that nothing is refused during a run. Everything else is a plain standard key.

The same users feed native `basic_auth` (htpasswd `{SHA}` lines) and `api_key_auth`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WASM = ROOT / "target/wasm32-wasip1/release/keygate_filter.wasm"
FLOOR_WASM = ROOT / "target/bench-floor/wasm32-wasip1/release/keygate_bench_floor.wasm"

# High enough never to refuse during a run (u32 requests per hour).
HUGE = {"requests": 1_000_000_000, "per": "1h"}
ACCOUNT_CONCURRENCY = 100_000
GEN_VERSION = 1  # bump when the output format changes (invalidates the cache)


def key_sid(i: int) -> str:
    return f"SK{i:032x}"


def account_sid(i: int) -> str:
    return f"AC{i // 10:032x}"


def secret(i: int) -> str:
    return "sk_live_" + hashlib.sha256(f"keygate-bench:{i}".encode()).hexdigest()[:32]


def bench_path() -> str:
    return f"/v2/accounts/{account_sid(0)}/calls"


def basic_header(i: int = 0) -> str:
    raw = f"{key_sid(i)}:{secret(i)}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def bearer_header(i: int = 0) -> str:
    return "Bearer " + secret(i)


APIS = [
    {
        "name": "calls",
        "methods": ["GET", "POST"],
        "paths": ["/v2/accounts/{account_sid}/calls", "/v2/accounts/{account_sid}/calls/**"],
    },
    {
        "name": "messages",
        "methods": ["GET", "POST"],
        "paths": [
            "/2010-04-01/Accounts/{account_sid}/Messages.json",
            "/2010-04-01/Accounts/{account_sid}/Messages/{sid}.json",
        ],
    },
    {
        "name": "keys",
        "management": True,
        "methods": ["GET", "POST", "DELETE"],
        "paths": [
            "/2010-04-01/Accounts/{account_sid}/Keys.json",
            "/2010-04-01/Accounts/{account_sid}/Keys/{key_sid}.json",
        ],
    },
    {"name": "balance", "publishable": True, "methods": ["GET"], "paths": ["/api/account/balance"]},
]


FULL = frozenset({"ips", "rates", "failed_auth", "concurrency"})


def keygate_config(
    n: int, version: int = 1, extra_key: int | None = None, features: frozenset[str] = FULL
) -> str:
    """The keygate plugin configuration (compact JSON) with `n` keys; `extra_key` adds key
    number `extra_key` (a key outside 0..n) to account 0, for the config-change measurement.
    `features` (a subset of FULL) selects which parts of key 0's full pipeline are configured,
    for the cost breakdown."""
    head = {
        "schema": "keygate.config/v1",
        "version": version,
        "settings": {"realm": "keygate", "secret_digest": "sha256"},
        "apis": APIS,
    }
    if "failed_auth" in features:
        head["limits"] = {"failed_auth": dict(HUGE)}
    out = [json.dumps(head, separators=(",", ":"))[:-1]]
    # Accounts: account 0 has its own rate and concurrency limits.
    accounts = []
    for a in range((n + 9) // 10):
        sid = f"AC{a:032x}"
        if a == 0:
            limits = {}
            if "rates" in features:
                limits["rate"] = HUGE
            if "concurrency" in features:
                limits["concurrency"] = ACCOUNT_CONCURRENCY
            doc = {"sid": sid, "status": "active"}
            if limits:
                doc["limits"] = limits
            accounts.append(json.dumps(doc, separators=(",", ":")))
        else:
            accounts.append(f'{{"sid":"{sid}","status":"active"}}')
    out.append(',"accounts":[' + ",".join(accounts) + "]")
    keys = []
    indices = list(range(n)) + ([extra_key] if extra_key is not None else [])
    for i in indices:
        digest = hashlib.sha256(secret(i).encode()).hexdigest()
        acct = account_sid(i) if i < n else account_sid(0)
        if i == 0:
            doc = {"sid": key_sid(0), "account_sid": acct, "role": "standard", "apis": ["calls"]}
            if "ips" in features:
                doc["allowed_ips"] = ["127.0.0.1/32"]
            if "rates" in features:
                doc["limits"] = {"rate": HUGE, "apis": {"calls": HUGE}}
            doc["secrets"] = [{"digest": digest}]
            keys.append(json.dumps(doc, separators=(",", ":")))
        else:
            keys.append(
                f'{{"sid":"{key_sid(i)}","account_sid":"{acct}","role":"standard",'
                f'"secrets":[{{"digest":"{digest}"}}]}}'
            )
    out.append(',"keys":[' + ",".join(keys) + "]}")
    return "".join(out)


def htpasswd(n: int) -> str:
    lines = []
    for i in range(n):
        sha = base64.b64encode(hashlib.sha1(secret(i).encode()).digest()).decode()
        lines.append(f"{key_sid(i)}:{{SHA}}{sha}")
    return "\n".join(lines) + "\n"


# ---- Envoy pieces -------------------------------------------------------------------------------


def _typed(type_name: str, **fields) -> dict:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def router() -> dict:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router"),
    }


def wasm_filter(name: str, wasm: Path, configuration: str | None) -> dict:
    config = {
        "name": name,
        "root_id": name,
        "vm_config": {
            "vm_id": name,
            "runtime": "envoy.wasm.runtime.v8",
            "code": {"local": {"filename": str(wasm)}},
        },
        "fail_open": False,
    }
    if configuration is not None:
        config["configuration"] = _typed("google.protobuf.StringValue", value=configuration)
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": _typed("envoy.extensions.filters.http.wasm.v3.Wasm", config=config),
    }


def basic_auth(n: int) -> dict:
    return {
        "name": "envoy.filters.http.basic_auth",
        "typed_config": _typed(
            "envoy.extensions.filters.http.basic_auth.v3.BasicAuth",
            users={"inline_string": htpasswd(n)},
        ),
    }


def api_key_auth(n: int) -> dict:
    return {
        "name": "envoy.filters.http.api_key_auth",
        "typed_config": _typed(
            "envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth",
            credentials=[{"key": secret(i), "client": key_sid(i)} for i in range(n)],
            key_sources=[{"header": "Authorization"}],
        ),
    }


def rbac_ip_allow() -> dict:
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": _typed(
            "envoy.extensions.filters.http.rbac.v3.RBAC",
            rules={
                "action": "ALLOW",
                "policies": {
                    "loopback": {
                        "permissions": [{"any": True}],
                        "principals": [
                            {"direct_remote_ip": {"address_prefix": "127.0.0.1", "prefix_len": 32}}
                        ],
                    }
                },
            },
        ),
    }


def local_ratelimit() -> dict:
    always = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": _typed(
            "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            stat_prefix="bench_rl",
            token_bucket={
                "max_tokens": 1_000_000_000,
                "tokens_per_fill": 1_000_000_000,
                "fill_interval": "3600s",
            },
            filter_enabled={"runtime_key": "bench_rl_enabled", **always},
            filter_enforced={"runtime_key": "bench_rl_enforced", **always},
        ),
    }


def listener(filters: list[dict], port: int = 0) -> dict:
    hcm = _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="bench",
        use_remote_address=True,
        normalize_path=True,
        merge_slashes=True,
        route_config={
            "name": "bench",
            "virtual_hosts": [
                {
                    "name": "direct",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
                        }
                    ],
                }
            ],
        },
        http_filters=filters + [router()],
    )
    return {
        "name": "bench",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


def static_bootstrap(filters: list[dict]) -> dict:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [listener(filters)]},
    }


def lds_bootstrap(lds_path: Path) -> dict:
    return {
        "node": {"id": "keygate-bench", "cluster": "keygate-bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "lds_config": {
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": str(lds_path),
                    "watched_directory": {"path": str(lds_path.parent)},
                },
            }
        },
    }


def lds_resources(filters: list[dict], port: int) -> dict:
    return {
        "resources": [
            {"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", **listener(filters, port)}
        ]
    }


# ---- the configurations benchmarked -------------------------------------------------------------

NATIVE_USERS = 1000


def configurations(sizes: list[int]) -> list[dict]:
    """Name, what it is, filters factory, and the Authorization header wrk sends."""
    confs = [
        {"name": "bare", "label": "(1) bare Envoy", "filters": lambda: [], "auth": None},
        {
            "name": "basic_auth",
            "label": f"(2) native basic_auth, {NATIVE_USERS // 1000}k users",
            "filters": lambda: [basic_auth(NATIVE_USERS)],
            "auth": basic_header(),
        },
        {
            "name": "api_key_auth",
            "label": f"(2) native api_key_auth, {NATIVE_USERS // 1000}k keys",
            "filters": lambda: [api_key_auth(NATIVE_USERS)],
            "auth": bearer_header(),
        },
        {
            "name": "native_composed",
            "label": "(3) native rbac + basic_auth + local_ratelimit",
            "filters": lambda: [rbac_ip_allow(), basic_auth(NATIVE_USERS), local_ratelimit()],
            "auth": basic_header(),
        },
        {
            "name": "wasm_floor",
            "label": "(4) wasm floor: read one header (v8)",
            "filters": lambda: [wasm_filter("floor", FLOOR_WASM, None)],
            "auth": basic_header(),
        },
    ]
    for n in sizes:
        confs.append(
            {
                "name": f"keygate_{size_name(n)}_basic",
                "label": f"(5) keygate full pipeline, {size_name(n)} keys, Basic",
                "filters": (lambda n=n: [wasm_filter("keygate", WASM, cached_config(n))]),
                "auth": basic_header(),
                "keys": n,
            }
        )
    n0 = sizes[0]
    other = os.environ.get("BENCH_WASM_B")
    if other:
        # A/B of two builds of the filter in the same run (BENCH_WASM_B=path/to/other.wasm).
        confs.append(
            {
                "name": f"keygate_{size_name(n0)}_basic_b",
                "label": f"(5) keygate full pipeline, {size_name(n0)} keys, Basic, build B",
                "filters": lambda: [wasm_filter("keygate", Path(other), cached_config(n0))],
                "auth": basic_header(),
                "keys": n0,
            }
        )
    confs.append(
        {
            "name": f"keygate_{size_name(n0)}_bearer",
            "label": f"(5) keygate full pipeline, {size_name(n0)} keys, Bearer",
            "filters": lambda: [wasm_filter("keygate", WASM, cached_config(n0))],
            "auth": bearer_header(),
            "keys": n0,
        }
    )
    return confs


# The cost breakdown (BENCH_BREAKDOWN=1): keygate at the first size with parts of the pipeline.
BREAKDOWN = [
    ("auth", frozenset(), "Basic auth + account binding + permissions only"),
    ("auth_ips", frozenset({"ips"}), "+ IP allowlist"),
    ("auth_ips_rates", frozenset({"ips", "rates"}), "+ key, key x API and account rates"),
    ("auth_ips_rates_fa", frozenset({"ips", "rates", "failed_auth"}), "+ failed-auth limiter"),
]


def breakdown_configurations(n: int) -> list[dict]:
    confs = [
        {
            "name": f"kg_{name}",
            "label": f"keygate {size_name(n)}: {label}",
            "filters": (lambda f=feats: [wasm_filter("keygate", WASM, keygate_config(n, features=f))]),
            "auth": basic_header(),
            "keys": n,
        }
        for name, feats, label in BREAKDOWN
    ]
    other = os.environ.get("BENCH_WASM_B")
    if other:
        # The first breakdown row (auth + binding + permissions) for build B too.
        name, feats, label = BREAKDOWN[0]
        confs.append(
            {
                "name": f"kg_{name}_b",
                "label": f"keygate {size_name(n)}: {label}, build B",
                "filters": (lambda f=feats: [wasm_filter("keygate", Path(other), keygate_config(n, features=f))]),
                "auth": basic_header(),
                "keys": n,
            }
        )
    return confs


def size_name(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


_CONFIG_CACHE: dict[int, str] = {}


def cached_config(n: int) -> str:
    if n not in _CONFIG_CACHE:
        _CONFIG_CACHE[n] = keygate_config(n)
    return _CONFIG_CACHE[n]


def write_json(path: Path, doc: dict) -> None:
    """Writes compact JSON atomically (write to a temp name, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
    os.replace(tmp, path)


if __name__ == "__main__":
    import sys

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    sys.stdout.write(keygate_config(n))
