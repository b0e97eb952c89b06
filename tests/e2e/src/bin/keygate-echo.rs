//! `keygate-echo [--port N] [--bind ADDR]`: the echo upstream for the demo (`make run`).
//! Answers every request with 200 and a JSON echo of its method, path and headers.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut port: u16 = 18080;
    let mut bind = "127.0.0.1".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--port", Some(v)) => match v.parse() {
                Ok(p) => port = p,
                Err(_) => return usage(&format!("bad port {v:?}")),
            },
            ("--bind", Some(v)) => bind = v,
            _ => return usage(&format!("unexpected argument {arg:?}")),
        }
    }
    match keygate_e2e::echo::Echo::serve_forever(&bind, port) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keygate-echo: cannot serve on {bind}:{port}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("keygate-echo: {problem}\nusage: keygate-echo [--port N (default 18080)] [--bind ADDR (default 127.0.0.1)]");
    ExitCode::from(2)
}
