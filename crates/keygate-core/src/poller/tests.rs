//! The poller against the model control plane of the published tests, with a fake dispatch
//! (requests recorded, answers given by hand) and a clock the test moves.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use super::*;
use crate::plugin::{parse_plugin_config, PluginConfig};
use crate::published::tests::{basic, judge, Model};
use crate::published::{read_head, RecordCache};
use crate::store::testing::FakeStore;
use crate::Reason;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const T0_US: u64 = 1_800_000_000 * 1_000_000;
/// Records per page.
const PAGE: usize = 2;

struct TestClock(Cell<u64>);

impl Clock for TestClock {
    fn now_us(&self) -> u64 {
        self.0.get()
    }
}

impl TestClock {
    fn advance_ms(&self, ms: u64) {
        self.0.set(self.0.get() + ms * 1000);
    }
}

/// Envoy's side of one VM: requests sent, the answer being handled, tick periods, events.
#[derive(Default)]
struct Feed {
    sent: Vec<(u32, Request)>,
    next_token: u32,
    refuse: bool,
    answer: (Vec<u8>, Vec<u8>),
    ticks: Vec<u64>,
    events: Vec<Event>,
}

impl Dispatch for Feed {
    fn send(&mut self, request: &Request) -> Option<u32> {
        if self.refuse {
            return None;
        }
        self.next_token += 1;
        self.sent.push((self.next_token, request.clone()));
        Some(self.next_token)
    }
    fn status(&mut self) -> Vec<u8> {
        self.answer.0.clone()
    }
    fn body(&mut self) -> Vec<u8> {
        self.answer.1.clone()
    }
    fn tick_every(&mut self, ms: u64) {
        self.ticks.push(ms);
    }
    fn report(&mut self, event: Event) {
        if !matches!(event, Event::Age(_)) {
            self.events.push(event);
        }
    }
}

/// One VM of the edge: its poller over the shared store and clock.
struct Vm {
    store: Rc<FakeStore>,
    clock: Rc<TestClock>,
    cp: ControlPlane,
    id: u64,
    poller: Poller,
    feed: Feed,
}

fn control_plane() -> ControlPlane {
    control_plane_with("")
}

/// The test control plane, with more fields (`,"edge_id":"e"`).
fn control_plane_with(fields: &str) -> ControlPlane {
    let json = format!(
        r#"{{"control_plane":{{"cluster":"c","authority":"a","token":"t","page_size":{PAGE},"max_backoff_ms":1000{fields}}}}}"#
    );
    match parse_plugin_config(json.as_bytes()).unwrap() {
        PluginConfig::ControlPlane(cp) => cp,
        PluginConfig::Static { .. } => unreachable!(),
    }
}

impl Vm {
    /// The first VM of a new edge (empty shared store, clock at `T0_US`).
    fn first() -> Vm {
        let clock = Rc::new(TestClock(Cell::new(T0_US)));
        Vm::with(Rc::new(FakeStore::new()), clock, 1)
    }

    /// Another VM of the same edge.
    fn sibling(&self, id: u64) -> Vm {
        Vm::with(self.store.clone(), self.clock.clone(), id)
    }

    fn with(store: Rc<FakeStore>, clock: Rc<TestClock>, id: u64) -> Vm {
        Vm {
            store,
            clock,
            cp: control_plane(),
            id,
            poller: Poller::default(),
            feed: Feed::default(),
        }
    }

    /// Runs `f` on the poller with this VM's host.
    fn drive(&mut self, f: impl FnOnce(&mut Poller, &mut Env<'_>)) {
        let mut env = Env {
            store: &*self.store,
            vm_id: self.id,
            control_plane: &self.cp,
            clock: &*self.clock,
            dispatch: &mut self.feed,
        };
        f(&mut self.poller, &mut env);
    }

    fn tick(&mut self) {
        self.drive(|poller, env| poller.on_tick(env));
    }

    fn answer(&mut self, token: u32, status: &str, body: Vec<u8>) {
        self.feed.answer = (status.into(), body);
        self.drive(|poller, env| poller.on_response(env, token));
    }

    fn last(&self) -> (u32, Request) {
        self.feed.sent.last().cloned().unwrap()
    }

    /// Answers the request sent as `token` with the model's page.
    fn serve_token(&mut self, model: &Model, token: u32) {
        let (_, req) = self
            .feed
            .sent
            .iter()
            .find(|(t, _)| *t == token)
            .cloned()
            .unwrap();
        let page = model.page(req.since, &req.after, PAGE);
        self.answer(token, "200", serde_json::to_vec(&page).unwrap());
    }

    /// Answers the last request sent with the model's page.
    fn serve(&mut self, model: &Model) {
        let (token, _) = self.last();
        self.serve_token(model, token);
    }

    /// Pages checked so far by the update under way.
    fn pages_checked(&self) -> Option<u64> {
        match self.poller.state() {
            State::Fetching { update, .. } | State::Waiting { update, .. } => Some(update.pages),
            _ => None,
        }
    }

    fn waiting(&self) -> bool {
        matches!(self.poller.state(), State::Waiting { .. })
    }

    /// Serves and ticks (a page waiting is checked on the tick) until an update ends (then the
    /// next long poll is out); the events it reported.
    fn run(&mut self, model: &Model) -> Vec<Event> {
        let from = self.feed.events.len();
        if self.pages_checked().is_none() {
            self.tick();
        }
        for _ in 0..100 {
            self.serve(model);
            if self.waiting() {
                self.tick();
            }
            let events = &self.feed.events[from..];
            let end =
                |e: &Event| matches!(e, Event::Published(_) | Event::WarmedUp(_) | Event::Failed);
            if events.iter().any(end) {
                return events.to_vec();
            }
        }
        unreachable!("the walk never ends")
    }
}

fn model_with_keys(n: usize) -> Model {
    let mut m = Model::new();
    for i in 1..=n {
        m.put_key(&format!("SK{i}"), &format!("s{i}"));
    }
    m
}

fn authenticates(store: &FakeStore, key: &str, secret: &str) -> Result<u64, Reason> {
    judge(
        store,
        &RefCell::new(RecordCache::default()),
        &basic(key, secret),
    )
}

fn published(events: &[Event]) -> Option<Finished> {
    events.iter().find_map(|e| match e {
        Event::Published(f) => Some(f.clone()),
        _ => None,
    })
}

fn retry_in_ms(vm: &Vm) -> u64 {
    match vm.poller.state() {
        State::Backoff { retry_at_ms } => retry_at_ms - vm.clock.now_us() / 1000,
        _ => panic!("not backing off"),
    }
}

#[test]
fn the_next_page_is_asked_for_before_this_one_is_checked_on_the_next_tick() {
    let model = model_with_keys(5);
    let mut vm = Vm::first();
    vm.tick();
    let (_, first) = vm.last();
    assert_eq!(first.path, "/v1/edge/changes?since=0&limit=2");
    assert_eq!(
        (first.since, first.after.as_str(), first.known),
        (0, "", None)
    );
    vm.serve(&model);
    // Page 1 (AC1, SK1) is answered: page 2 is asked for at once, page 1 waits unchecked.
    assert!(vm.waiting());
    assert_eq!(vm.pages_checked(), Some(0));
    assert_eq!(vm.last().1.after, "SK1");
    assert_eq!(vm.feed.ticks, [FAST_TICK_MS]);
    vm.tick();
    assert_eq!(vm.pages_checked(), Some(1), "checked on the next tick");
    assert_eq!(vm.feed.ticks, [FAST_TICK_MS, TICK_MS]);
    assert_eq!(
        vm.feed.sent.len(),
        2,
        "the page asked for ahead was the one needed"
    );
    let events = vm.run(&model);
    let f = published(&events).unwrap();
    assert_eq!((f.version, f.pages, f.both_slots), (model.version, 4, true));
    // Then the next update's long poll at the version in force, at once.
    let afters: Vec<&str> = vm.feed.sent.iter().map(|(_, r)| r.after.as_str()).collect();
    assert_eq!(afters, ["", "SK1", "SK3", "SK5", ""]);
    assert_eq!(authenticates(&vm.store, "SK4", "s4"), Ok(model.version));
    let (_, long_poll) = vm.last();
    assert_eq!(long_poll.known, Some(model.version));
    assert!(long_poll
        .path
        .ends_with(&format!("&known={}&wait=20", model.version)));
}

#[test]
fn an_answer_that_arrives_before_the_tick_checks_the_waiting_page_first() {
    let model = model_with_keys(5);
    let mut vm = Vm::first();
    vm.tick();
    vm.serve(&model);
    assert!(vm.waiting());
    // No tick: each answer checks the page waiting before it.
    for checked in 1..=2 {
        vm.serve(&model);
        assert_eq!(vm.pages_checked(), Some(checked));
    }
    assert_eq!(vm.feed.sent.len(), 4);
    assert_eq!(vm.feed.ticks, [FAST_TICK_MS], "no tick came");
    vm.serve(&model);
    assert_eq!(published(&vm.feed.events).unwrap().version, model.version);
    assert_eq!(authenticates(&vm.store, "SK5", "s5"), Ok(model.version));
}

#[test]
fn a_refused_page_drops_the_answer_asked_for_ahead() {
    let mut model = model_with_keys(1);
    let mut vm = Vm::first();
    vm.run(&model);
    let v1 = model.version;
    for i in 7..=9 {
        model.put_key(&format!("SK{i}"), &format!("s{i}"));
    }
    vm.tick();
    let (token, req) = vm.last();
    assert_eq!(req.known, Some(v1));
    // A replayed first page: the version in force, with a next cursor.
    let mut page = model.page(req.since, &req.after, PAGE);
    page.version = v1;
    vm.answer(token, "200", serde_json::to_vec(&page).unwrap());
    assert!(vm.waiting());
    let (ahead, _) = vm.last();
    vm.tick();
    assert!(vm.feed.events.ends_with(&[
        Event::Rejected(Rejection::NotNewer {
            offered: v1,
            in_force: v1
        }),
        Event::Failed
    ]));
    assert!(matches!(vm.poller.state(), State::Backoff { .. }));
    let (sent, events) = (vm.feed.sent.len(), vm.feed.events.len());
    vm.serve_token(&model, ahead);
    assert_eq!(
        (vm.feed.sent.len(), vm.feed.events.len()),
        (sent, events),
        "the answer asked for ahead is ignored"
    );
    assert_eq!(read_head(&*vm.store).map(|h| h.version), Some(v1));
    assert_eq!(
        authenticates(&vm.store, "SK8", "s8"),
        Err(Reason::InvalidCredentials)
    );
}

#[test]
fn a_walk_started_over_drops_the_answer_asked_for_ahead() {
    let mut model = model_with_keys(3);
    let mut vm = Vm::first();
    vm.run(&model);
    // The API catalogue changes: the free slot is refilled from scratch.
    let mut api = model.apis[0].clone();
    api.name = "messages".into();
    model.apis.push(api);
    for i in 7..=9 {
        model.put_key(&format!("SK{i}"), &format!("s{i}"));
    }
    vm.tick();
    vm.serve(&model);
    assert!(vm.waiting());
    let (ahead, ahead_req) = vm.last();
    assert_ne!(ahead_req.after, "");
    vm.tick();
    let (token, req) = vm.last();
    assert_ne!(token, ahead);
    assert_eq!((req.since, req.after.as_str(), req.known), (0, "", None));
    let sent = vm.feed.sent.len();
    vm.serve_token(&model, ahead);
    assert_eq!(
        vm.feed.sent.len(),
        sent,
        "the answer asked for ahead is ignored"
    );
    let events = vm.run(&model);
    assert_eq!(published(&events).unwrap().version, model.version);
    assert_eq!(authenticates(&vm.store, "SK9", "s9"), Ok(model.version));
}

#[test]
fn http_errors_timeouts_and_unsent_requests_back_off_exponentially_with_jitter() {
    let model = model_with_keys(1);
    let mut vm = Vm::first();
    vm.tick();
    let (token, _) = vm.last();
    vm.answer(token, "503", Vec::new());
    assert!(vm
        .feed
        .events
        .ends_with(&[Event::FetchFailed(b"503".to_vec()), Event::Failed]));
    let wait = retry_in_ms(&vm);
    assert!((125..375).contains(&wait), "{wait}");
    vm.tick();
    assert_eq!(vm.feed.sent.len(), 1, "nothing is asked while backing off");
    vm.clock.advance_ms(wait);
    vm.tick();
    let (token, _) = vm.last();
    assert_eq!(vm.feed.sent.len(), 2);
    // A timeout or a reset: no status.
    vm.answer(token, "", Vec::new());
    assert!(vm
        .feed
        .events
        .ends_with(&[Event::FetchFailed(Vec::new()), Event::Failed]));
    let wait = retry_in_ms(&vm);
    assert!((250..750).contains(&wait), "{wait}");
    vm.clock.advance_ms(wait);
    vm.feed.refuse = true;
    vm.tick();
    assert!(vm.feed.events.ends_with(&[Event::Fetch, Event::Failed]));
    let wait = retry_in_ms(&vm);
    assert!((500..1500).contains(&wait), "{wait}");
    vm.clock.advance_ms(wait);
    vm.tick();
    let wait = retry_in_ms(&vm);
    assert!(
        (500..1500).contains(&wait),
        "capped at max_backoff_ms: {wait}"
    );
    // A success resets the count.
    vm.feed.refuse = false;
    vm.clock.advance_ms(wait);
    let events = vm.run(&model);
    assert_eq!(published(&events).unwrap().version, model.version);
    vm.tick();
    let (token, _) = vm.last();
    vm.answer(token, "500", Vec::new());
    assert!((125..375).contains(&retry_in_ms(&vm)));
    for failures in 1..40 {
        let base = (FIRST_BACKOFF_MS << (failures - 1).min(16)).min(1000);
        for now in [0, 1, T0_US, u64::MAX] {
            let b = backoff_ms(failures, 1000, 7, now);
            assert!(b >= base / 2 && b < base / 2 + base, "{failures} {now} {b}");
        }
    }
}

#[test]
fn a_page_that_does_not_parse_is_rejected_and_nothing_is_written() {
    let mut vm = Vm::first();
    vm.tick();
    let (token, _) = vm.last();
    vm.answer(token, "200", b"{\"schema\":".to_vec());
    assert!(matches!(
        vm.feed.events.as_slice(),
        [
            Event::Fetch,
            Event::Rejected(Rejection::Invalid(_)),
            Event::Failed
        ]
    ));
    assert!(matches!(vm.poller.state(), State::Backoff { .. }));
    assert_eq!(read_head(&*vm.store), None);
}

#[test]
fn gone_fills_the_free_slot_from_scratch() {
    let mut model = model_with_keys(2);
    let mut vm = Vm::first();
    vm.run(&model);
    model.delete("SK1");
    vm.tick();
    let (token, req) = vm.last();
    assert_ne!(req.since, 0);
    vm.answer(token, "410", Vec::new());
    assert!(vm.feed.events.ends_with(&[Event::Gone, Event::Fetch]));
    let (_, req) = vm.last();
    assert_eq!((req.since, req.after.as_str(), req.known), (0, "", None));
    let events = vm.run(&model);
    assert_eq!(published(&events).unwrap().version, model.version);
    assert_eq!(
        authenticates(&vm.store, "SK1", "s1"),
        Err(Reason::InvalidCredentials)
    );
    assert_eq!(authenticates(&vm.store, "SK2", "s2"), Ok(model.version));
}

#[test]
fn not_modified_records_contact_and_long_polls_again_at_once() {
    let model = model_with_keys(1);
    let mut vm = Vm::first();
    vm.run(&model);
    vm.clock.advance_ms(10_000);
    vm.tick();
    let (token, req) = vm.last();
    vm.answer(token, "304", Vec::new());
    assert!(vm.feed.events.contains(&Event::NotModified));
    assert_eq!(
        read_head(&*vm.store).map(|h| h.contacted_at_s),
        Some(T0_US / 1_000_000 + 10)
    );
    let (again, next) = vm.last();
    assert_ne!(again, token);
    assert_eq!(next, req, "the same long poll, asked again right away");
}

#[test]
fn a_poller_that_lost_its_role_drops_its_update_and_the_new_one_publishes() {
    let model = model_with_keys(5);
    let mut a = Vm::first();
    let mut b = a.sibling(2);
    a.tick();
    b.tick();
    assert_eq!((a.feed.sent.len(), b.feed.sent.len()), (1, 0), "one poller");
    a.serve(&model);
    assert!(a.waiting());
    let (ahead, _) = a.last();
    // `a` goes silent past the lease: `b` takes over and starts its own update.
    a.clock.advance_ms((POLLER_LEASE_S + 1) * 1000);
    b.tick();
    assert_eq!(b.feed.sent.len(), 1);
    // `a`'s waiting page and the answer asked for ahead are dropped.
    a.tick();
    assert!(matches!(a.poller.state(), State::Idle));
    a.serve_token(&model, ahead);
    assert_eq!(a.feed.sent.len(), 2);
    assert_eq!(a.pages_checked(), None);
    // An answer that arrives after the role moved is dropped too.
    let (token, _) = b.last();
    a.clock.advance_ms((POLLER_LEASE_S + 1) * 1000);
    a.tick();
    assert_eq!(a.feed.sent.len(), 3, "`a` took the role back");
    b.serve_token(&model, token);
    assert!(matches!(b.poller.state(), State::Idle));
    assert_eq!(b.feed.sent.len(), 1);
    assert_eq!(read_head(&*a.store), None, "nothing written by either");
    let events = a.run(&model);
    assert_eq!(published(&events).unwrap().version, model.version);
}

/// The path a request for `req`'s position should have, ending with `name` (the edge's
/// `&edge=..&region=..`, or nothing).
fn expected_path(req: &Request, name: &str) -> String {
    let after = match req.after.as_str() {
        "" => String::new(),
        a => format!("&after={a}"),
    };
    let known = match req.known {
        Some(v) => format!("&known={v}&wait=20"),
        None => String::new(),
    };
    format!(
        "/v1/edge/changes?since={}&limit={PAGE}{after}{known}{name}",
        req.since
    )
}

#[test]
fn a_named_edge_sends_its_id_and_region_on_every_feed_request() {
    let mut model = model_with_keys(5);
    let mut vm = Vm::first();
    vm.cp = control_plane_with(r#","edge_id":"edge-a","region":"us1""#);
    // The first fill, page by page (pages asked for ahead included).
    let events = vm.run(&model);
    assert_eq!(published(&events).unwrap().version, model.version);
    // A long poll answered 304, asked again; then a change.
    let (token, _) = vm.last();
    vm.answer(token, "304", Vec::new());
    model.delete("SK1");
    let events = vm.run(&model);
    assert_eq!(published(&events).unwrap().version, model.version);
    // A failure and its retry; a 410 and the walk from scratch.
    let (token, _) = vm.last();
    vm.answer(token, "503", Vec::new());
    vm.clock.advance_ms(retry_in_ms(&vm));
    vm.tick();
    let (token, _) = vm.last();
    model.delete("SK2");
    vm.answer(token, "410", Vec::new());
    let events = vm.run(&model);
    assert_eq!(published(&events).unwrap().version, model.version);
    assert_eq!(
        authenticates(&vm.store, "SK2", "s2"),
        Err(Reason::InvalidCredentials)
    );

    let sent: Vec<&Request> = vm.feed.sent.iter().map(|(_, r)| r).collect();
    assert!(sent.len() >= 12, "{}", sent.len());
    assert!(sent.iter().any(|r| r.known.is_some()) && sent.iter().any(|r| !r.after.is_empty()));
    for req in &sent {
        assert_eq!(req.path, expected_path(req, "&edge=edge-a&region=us1"));
    }

    // An id without a region, and neither: nothing is sent for a name not configured. A region
    // without an id is enforced at the edge but not sent (the fleet view knows edges by id).
    for (fields, name) in [
        (r#","edge_id":"edge-b""#, "&edge=edge-b"),
        ("", ""),
        (r#","region":"in1""#, ""),
    ] {
        let model = model_with_keys(3);
        let mut vm = Vm::first();
        vm.cp = control_plane_with(fields);
        vm.run(&model);
        assert!(vm.feed.sent.len() >= 3);
        for (_, req) in &vm.feed.sent {
            assert_eq!(req.path, expected_path(req, name));
        }
    }
}
