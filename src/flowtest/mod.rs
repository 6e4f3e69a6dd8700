//! Conversation tests for flow projects: `flows/tests/*.yaml`.
//!
//! The runner drives the same engine as `serve`, in-process: services
//! answer from the case's stubs (or their declared mocks) through a stub
//! `Transport`, the LLM from the case's stub `Classifier`, and each case runs
//! on its own paused Tokio clock, so a stubbed 5 s timeout takes no wall
//! time. Cases run in parallel; results are reported in file order.

pub mod recorded;
pub mod report;
pub mod spec;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde_json::Value as Json;

use crate::channels;
use crate::diagnostic::{Code, Diagnostic, Location, Sources, did_you_mean};
use crate::engine::{self, TurnDeps, TurnOutcome};
use crate::intent::{self, Classification, Classifier};
use crate::load::{self, FLOWS_DIR, TESTS_DIR};
use crate::project::{Channel, ChannelKind, CompiledProject, Decision, IntentId, Service};
use crate::services::{OutgoingRequest, RawResponse, ServiceMode, Transport, TransportError};
use crate::session::{MemorySessionStore, SessionStore};
use crate::spec::{Position, Spanned};
use spec::{Case, LlmFailure, ReplyExpectation, StubFailure, TestFile};

/// The user id of a turn whose request names none.
pub const DEFAULT_USER_ID: &str = "test-user";
/// Time a turn may take on the test clock.
pub const TURN_TIMEOUT: Duration = Duration::from_secs(30);

/// The test files of a project, parsed.
#[derive(Debug, Default)]
pub struct LoadedTests {
    pub files: Vec<(PathBuf, TestFile)>,
    pub diagnostics: Vec<Diagnostic>,
    pub sources: Sources,
}

/// Reads every `flows/tests/*.yaml`.
pub fn load_tests(dir: &Path, environment: &load::Environment) -> LoadedTests {
    let mut loaded = LoadedTests::default();
    let tests_dir = dir.join(FLOWS_DIR).join(TESTS_DIR);
    let Ok(entries) = std::fs::read_dir(&tests_dir) else {
        return loaded;
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    paths.sort();
    for path in paths {
        let relative = path
            .strip_prefix(dir)
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| path.clone());
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) => {
                loaded.diagnostics.push(Diagnostic::error(
                    Code::Io,
                    Location::file(&relative),
                    format!("cannot read `{}`: {error}", relative.display()),
                ));
                continue;
            }
        };
        match load::parse_document::<TestFile>(&relative, &text, environment) {
            Ok((file, warnings)) => {
                loaded.diagnostics.extend(warnings);
                loaded.files.push((relative.clone(), file));
            }
            Err(diagnostics) => loaded.diagnostics.extend(diagnostics),
        }
        loaded.sources.insert(relative, text);
    }
    loaded
}

/// Names in the tests that the project does not define: services, intents,
/// flows, routes; stub files that cannot be read; bad durations and regexes.
pub fn check_tests(project: &CompiledProject, tests: &LoadedTests) -> Vec<Diagnostic> {
    let mut diagnostics = Vec::new();
    let services: Vec<&str> = project.services.iter().map(|s| s.name.as_str()).collect();
    let intents: Vec<&str> = project.intents.iter().map(|i| i.name.as_str()).collect();
    let flows: Vec<&str> = project.flows.iter().map(|f| f.name.as_str()).collect();
    let routes: Vec<&str> = project
        .routes
        .iter()
        .map(String::as_str)
        .chain(flows.iter().copied())
        .collect();
    for (file, test_file) in &tests.files {
        let mut name_check = |code: Code, what: &str, name: &Spanned<String>, known: &[&str]| {
            if !known.contains(&name.value.as_str()) {
                diagnostics.push(
                    Diagnostic::error(
                        code,
                        Location::new(file, name.position, name.value.chars().count()),
                        format!("unknown {what} `{}`", name.value),
                    )
                    .with_optional_hint(did_you_mean(&name.value, known.iter().copied())),
                );
            }
        };
        for case in &test_file.cases {
            for turn in &case.value.turns.value {
                let turn = &turn.value;
                if let Some(llm) = &turn.llm
                    && let Some(intent) = &llm.value.intent
                {
                    name_check(Code::UnknownIntent, "intent", intent, &intents);
                }
                for service in turn.services.keys() {
                    name_check(Code::UnknownService, "service", service, &services);
                }
                if let Some(expect) = &turn.expect {
                    let expect = &expect.value;
                    if let Some(route) = &expect.route {
                        name_check(Code::UnknownRoute, "route", route, &routes);
                    }
                    if let Some(intent) = &expect.intent {
                        name_check(Code::UnknownIntent, "intent", intent, &intents);
                    }
                    if let Some(flow) = &expect.flow {
                        name_check(Code::UnknownFlow, "flow", flow, &flows);
                    }
                    if let Some(decision) = &expect.decision {
                        name_check(
                            Code::UnknownDecision,
                            "decision",
                            decision,
                            &Decision::ALL.map(Decision::as_str),
                        );
                    }
                    for call in expect.calls.iter().flat_map(|calls| calls.value.iter()) {
                        name_check(
                            Code::UnknownService,
                            "service",
                            &call.value.service,
                            &services,
                        );
                    }
                }
            }
        }
        if let Some(golden) = &test_file.golden {
            for example in &golden.value.examples {
                name_check(
                    Code::UnknownIntent,
                    "intent",
                    &example.value.intent,
                    &intents,
                );
            }
        }
        // Values that can only be checked by trying them.
        for case in &test_file.cases {
            for spanned_turn in &case.value.turns.value {
                let turn = &spanned_turn.value;
                diagnostics.extend(check_turn_source(project, file, spanned_turn));
                if let Some(request) = &turn.request
                    && !matches!(&request.value, crate::spec::TemplateValue::Map(entries)
                    if entries.iter().any(|(key, value)| key.value == "text"
                        && matches!(value.value, crate::spec::TemplateValue::String(_))))
                {
                    diagnostics.push(Diagnostic::error(
                        Code::InvalidValue,
                        Location::new(file, request.position, 1),
                        "`request` must be a mapping with a string `text`",
                    ));
                }
                for stubs in turn.services.values() {
                    match spec::decode_stubs(&stubs.value) {
                        Ok(decoded) => {
                            for stub in &decoded {
                                if let Err(diagnostic) =
                                    stub_answer(&project.dir, file, stubs.position, stub)
                                {
                                    diagnostics.push(*diagnostic);
                                }
                            }
                        }
                        Err(error) => diagnostics.push(Diagnostic::error(
                            Code::InvalidValue,
                            Location::new(file, stubs.position, 1),
                            format!("invalid service stub: {error}"),
                        )),
                    }
                }
                if let Some(expect) = &turn.expect
                    && let Some(reply) = &expect.value.reply
                    && let ReplyExpectation::Matches(pattern) = &reply.value
                    && let Err(error) = regex::Regex::new(pattern)
                {
                    diagnostics.push(Diagnostic::error(
                        Code::InvalidRegex,
                        Location::new(file, reply.position, 1),
                        format!("invalid regular expression: {error}"),
                    ));
                }
            }
        }
    }
    diagnostics
}

/// A turn comes from `request`, or from `channel` and `payload`; the
/// channel must be declared, and `outbound` and `ignored` need one.
fn check_turn_source(
    project: &CompiledProject,
    file: &Path,
    turn: &Spanned<spec::Turn>,
) -> Vec<Diagnostic> {
    let mut diagnostics = Vec::new();
    let value = &turn.value;
    let mut error = |position: Position, message: String, hint: Option<String>| {
        diagnostics.push(
            Diagnostic::error(
                Code::InvalidValue,
                Location::new(file, position, 1),
                message,
            )
            .with_optional_hint(hint),
        );
    };
    match (&value.request, &value.channel, &value.payload) {
        (Some(_), None, None) => {}
        (None, Some(channel), Some(_)) => {
            if project.channel(&channel.value).is_none() {
                let names = project.channels.iter().map(|c| c.name.as_str());
                error(
                    channel.position,
                    format!("unknown channel `{}`", channel.value),
                    did_you_mean(&channel.value, names),
                );
            }
        }
        _ => error(
            turn.position,
            "a turn needs either `request`, or `channel` and `payload`".to_owned(),
            Some("`request:` is a `POST /orchestrate` body; `channel:` + `payload:` a platform's delivery".to_owned()),
        ),
    }
    if value.channel.is_none()
        && let Some(expect) = &value.expect
    {
        for position in [
            expect.value.outbound.as_ref().map(|o| o.position),
            expect.value.ignored.as_ref().map(|i| i.position),
        ]
        .into_iter()
        .flatten()
        {
            error(
                position,
                "`outbound` and `ignored` are expectations of a channel turn".to_owned(),
                Some("give the turn `channel:` and `payload:`".to_owned()),
            );
        }
    }
    diagnostics
}

/// `check`, tests included: the project's diagnostics, then (when the
/// project compiles) those of its test files. `serve` does not read tests.
pub fn check_with_tests(dir: &Path, environment: &load::Environment) -> crate::check::Checked {
    let mut checked = crate::check::check_project(dir, environment);
    let tests = load_tests(dir, environment);
    if let Some(project) = &checked.project {
        checked.diagnostics.extend(check_tests(project, &tests));
    }
    checked.diagnostics.extend(tests.diagnostics);
    checked.sources.merge(tests.sources);
    crate::diagnostic::sort(&mut checked.diagnostics);
    if checked.diagnostics.iter().any(Diagnostic::is_error) {
        checked.project = None;
    }
    checked
}

/// One stubbed answer, ready to serve.
#[derive(Debug, Clone)]
enum StubAnswer {
    Respond {
        status: u16,
        body: Bytes,
        delay: Duration,
    },
    Fail {
        failure: StubFailure,
        delay: Duration,
    },
}

fn stub_answer(
    dir: &Path,
    file: &Path,
    position: Position,
    stub: &spec::ServiceStub,
) -> Result<StubAnswer, Box<Diagnostic>> {
    let delay = match &stub.delay {
        Some(delay) => humantime::parse_duration(delay.trim()).map_err(|error| {
            Box::new(Diagnostic::error(
                Code::InvalidDuration,
                Location::new(file, position, 1),
                format!("invalid duration `{delay}`: {error}"),
            ))
        })?,
        None => Duration::ZERO,
    };
    if let Some(failure) = stub.error {
        return Ok(StubAnswer::Fail { failure, delay });
    }
    let body = match (&stub.response, &stub.file) {
        (Some(response), None) => serde_json::to_vec(response).unwrap_or_default(),
        (None, Some(path)) => {
            let relative = Path::new(path.trim());
            let readable = relative
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            match readable.then(|| std::fs::read(dir.join(relative))) {
                Some(Ok(bytes)) => bytes,
                _ => {
                    return Err(Box::new(Diagnostic::error(
                        Code::MockMissing,
                        Location::new(file, position, 1),
                        format!("cannot read stub file `{}`", relative.display()),
                    )));
                }
            }
        }
        (None, None) if stub.status.is_some() => Vec::new(),
        _ => {
            return Err(Box::new(Diagnostic::error(
                Code::InvalidValue,
                Location::new(file, position, 1),
                "a service stub needs one of `response`, `file`, `status` or `error` (not both `response` and `file`)",
            )));
        }
    };
    Ok(StubAnswer::Respond {
        status: stub.status.unwrap_or(200),
        body: Bytes::from(body),
        delay,
    })
}

/// Answers calls from a turn's stubs, else from the services' mocks, and
/// records every attempt.
struct StubTransport {
    stubs: HashMap<String, Vec<StubAnswer>>,
    only_stubbed: bool,
    attempts: Mutex<Vec<(String, Option<Json>)>>,
}

impl Transport for StubTransport {
    fn send<'a>(
        &'a self,
        service: &'a Service,
        request: OutgoingRequest<'a>,
    ) -> BoxFuture<'a, Result<RawResponse, TransportError>> {
        Box::pin(async move {
            let body = request
                .body
                .and_then(|body| serde_json::from_slice(body).ok());
            let attempt = {
                let mut attempts = self
                    .attempts
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let attempt = attempts
                    .iter()
                    .filter(|(name, _)| *name == service.name)
                    .count();
                attempts.push((service.name.clone(), body));
                attempt
            };
            let answer = match self.stubs.get(&service.name) {
                Some(answers) => answers.get(attempt).or(answers.last()).cloned(),
                None if self.only_stubbed => None,
                None => service.mock.as_ref().map(|mock| StubAnswer::Respond {
                    status: mock.status,
                    body: Bytes::from(serde_json::to_vec(&mock.body).unwrap_or_default()),
                    delay: Duration::ZERO,
                }),
            };
            let Some(answer) = answer else {
                return Err(TransportError::Connect(format!(
                    "service `{}` is not stubbed in this case",
                    service.name
                )));
            };
            let (delay, result) = match answer {
                StubAnswer::Respond {
                    status,
                    body,
                    delay,
                } => (delay, Ok(RawResponse { status, body })),
                StubAnswer::Fail { failure, delay } => match failure {
                    // A timeout waits the whole attempt out, on the test clock.
                    StubFailure::Timeout => (request.timeout, Err(TransportError::Timeout)),
                    StubFailure::ConnectionRefused => (
                        delay,
                        Err(TransportError::Connect(
                            "connection refused (stub)".to_owned(),
                        )),
                    ),
                    StubFailure::NotJson => (
                        delay,
                        Ok(RawResponse {
                            status: 200,
                            body: Bytes::from_static(
                                b"<html>Service temporarily unavailable</html>",
                            ),
                        }),
                    ),
                },
            };
            if delay >= request.timeout {
                tokio::time::sleep(request.timeout).await;
                return Err(TransportError::Timeout);
            }
            tokio::time::sleep(delay).await;
            result
        })
    }
}

/// Answers as a turn's `llm:` stub says; the rules when it fails or is absent.
struct StubClassifier {
    answer: Option<Result<(IntentId, f64), LlmFailure>>,
}

impl Classifier for StubClassifier {
    fn classify<'a>(
        &'a self,
        project: &'a CompiledProject,
        text: &'a str,
    ) -> BoxFuture<'a, Classification> {
        Box::pin(async move {
            match self.answer {
                Some(Ok((intent, confidence))) => intent::decide(project, text, intent, confidence),
                Some(Err(failure)) => {
                    if failure == LlmFailure::Timeout {
                        tokio::time::sleep(project.classifier.llm.timeout).await;
                    }
                    let mut classification = intent::classify_by_rules(project, text);
                    classification.fallback_reason = Some(format!("{failure:?}"));
                    classification
                }
                None => intent::classify_by_rules(project, text),
            }
        })
    }
}

/// One unmet expectation.
#[derive(Debug, Clone)]
pub struct Failure {
    /// 1-based turn number; 0 for the case as a whole.
    pub turn: usize,
    /// Where the expectation is written.
    pub position: Position,
    pub what: String,
    pub expected: String,
    pub actual: String,
    /// Where the flow went: the step that replied, and the route.
    pub path: Option<String>,
}

#[derive(Debug, Clone)]
pub struct CaseResult {
    pub file: PathBuf,
    pub name: String,
    pub position: Position,
    pub turns: usize,
    pub failures: Vec<Failure>,
    /// Steps reached, by index, and routes answered.
    pub visited: BTreeSet<u32>,
    pub routes: BTreeSet<String>,
    /// Wall time of the case.
    pub elapsed: Duration,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct GoldenResult {
    pub file: PathBuf,
    pub position: Position,
    pub total: usize,
    pub correct: usize,
    pub min_accuracy: f64,
    /// (text, expected, actual, position)
    pub misclassified: Vec<(String, String, String, Position)>,
    /// Per intent the set expects, in the project's order: (intent,
    /// correct, total).
    pub by_intent: Vec<(String, usize, usize)>,
}

impl GoldenResult {
    /// The intents taken for one another: (expected, actual, how many
    /// texts), the most frequent first.
    pub fn confusions(&self) -> Vec<(&str, &str, usize)> {
        let mut counts: std::collections::BTreeMap<(&str, &str), usize> = Default::default();
        for (_, expected, actual, _) in &self.misclassified {
            *counts
                .entry((expected.as_str(), actual.as_str()))
                .or_default() += 1;
        }
        let mut pairs: Vec<(&str, &str, usize)> = counts
            .into_iter()
            .map(|((expected, actual), count)| (expected, actual, count))
            .collect();
        pairs.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| (a.0, a.1).cmp(&(b.0, b.1))));
        pairs
    }

    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }

    pub fn passed(&self) -> bool {
        self.accuracy() + f64::EPSILON >= self.min_accuracy
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    pub cases: Vec<CaseResult>,
    pub golden: Vec<GoldenResult>,
}

impl Report {
    /// The same results with every file under `prefix` (a tenant's folder
    /// in a deployment of several).
    pub fn under(mut self, prefix: &Path) -> Report {
        for case in &mut self.cases {
            case.file = prefix.join(&case.file);
        }
        for golden in &mut self.golden {
            golden.file = prefix.join(&golden.file);
        }
        self
    }

    /// Both reports' results, `other`'s after.
    pub fn extend(&mut self, other: Report) {
        self.cases.extend(other.cases);
        self.golden.extend(other.golden);
    }

    /// (passed, failed), counting each case and each golden set once.
    pub fn counts(&self) -> (usize, usize) {
        let passed = self.cases.iter().filter(|c| c.passed()).count()
            + self.golden.iter().filter(|g| g.passed()).count();
        (passed, self.cases.len() + self.golden.len() - passed)
    }

    pub fn passed(&self) -> bool {
        self.cases.iter().all(CaseResult::passed) && self.golden.iter().all(GoldenResult::passed)
    }
}

/// Which tests to run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Selection<'a> {
    /// Only the cases whose name contains this text (and no golden set).
    pub filter: Option<&'a str>,
    /// Only the golden sets, no case.
    pub golden_only: bool,
}

/// Runs the selected cases, in parallel, and the golden sets.
pub fn run(project: &CompiledProject, tests: &LoadedTests, selection: Selection<'_>) -> Report {
    let Selection {
        filter,
        golden_only,
    } = selection;
    let cases: Vec<(&Path, &Spanned<Case>)> = tests
        .files
        .iter()
        .flat_map(|(file, test_file)| {
            test_file
                .cases
                .iter()
                .map(move |case| (file.as_path(), case))
        })
        .filter(|(_, case)| filter.is_none_or(|filter| case.value.name.value.contains(filter)))
        .filter(|_| !golden_only)
        .collect();
    let results: Vec<Mutex<Option<CaseResult>>> = cases.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(cases.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some((file, case)) = cases.get(index) else {
                        break;
                    };
                    let result = run_case(project, file, case);
                    *results[index]
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(result);
                }
            });
        }
    });
    let cases = results
        .into_iter()
        .filter_map(|slot| {
            slot.into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        })
        .collect();
    let golden = tests
        .files
        .iter()
        .filter(|_| filter.is_none())
        .filter_map(|(file, test_file)| {
            test_file
                .golden
                .as_ref()
                .map(|golden| run_golden(project, file, golden))
        })
        .collect();
    Report { cases, golden }
}

fn run_golden(
    project: &CompiledProject,
    file: &Path,
    golden: &Spanned<spec::GoldenSet>,
) -> GoldenResult {
    let mut correct = 0;
    let mut misclassified = Vec::new();
    // (correct, total) by intent id; a name no intent has is reported by
    // `check` and counts nowhere here.
    let mut by_intent = vec![(0usize, 0usize); project.intents.len()];
    for example in &golden.value.examples {
        let classification = intent::classify_by_rules(project, &example.value.text.value);
        let actual = &project.intent(classification.intent).name;
        let expected = project
            .intents
            .iter()
            .position(|intent| intent.name == example.value.intent.value);
        if let Some(score) = expected.and_then(|index| by_intent.get_mut(index)) {
            score.1 += 1;
            if *actual == example.value.intent.value {
                score.0 += 1;
            }
        }
        if *actual == example.value.intent.value {
            correct += 1;
        } else {
            misclassified.push((
                example.value.text.value.clone(),
                example.value.intent.value.clone(),
                actual.clone(),
                example.position,
            ));
        }
    }
    GoldenResult {
        file: file.to_path_buf(),
        position: golden.position,
        total: golden.value.examples.len(),
        correct,
        min_accuracy: golden.value.min_accuracy.value,
        misclassified,
        by_intent: project
            .intents
            .iter()
            .zip(by_intent)
            .filter(|(_, (_, total))| *total > 0)
            .map(|(intent, (correct, total))| (intent.name.clone(), correct, total))
            .collect(),
    }
}

fn run_case(project: &CompiledProject, file: &Path, case: &Spanned<Case>) -> CaseResult {
    let started = std::time::Instant::now();
    let mut result = CaseResult {
        file: file.to_path_buf(),
        name: case.value.name.value.clone(),
        position: case.position,
        turns: case.value.turns.value.len(),
        failures: Vec::new(),
        visited: BTreeSet::new(),
        routes: BTreeSet::new(),
        elapsed: Duration::ZERO,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            result.failures.push(Failure {
                turn: 0,
                position: case.position,
                what: "runtime".to_owned(),
                expected: "a test runtime".to_owned(),
                actual: error.to_string(),
                path: None,
            });
            return result;
        }
    };
    // Circuit breakers live as long as the case: its turns share them, as a
    // process's turns do.
    let breakers = crate::services::CircuitBreakers::default();
    runtime.block_on(async {
        let sessions = MemorySessionStore::new(Duration::from_secs(3600), 16);
        let placeholder = url::Url::parse("http://stubbed.invalid/").ok();
        let modes: Vec<ServiceMode> = project
            .services
            .iter()
            .map(|_| {
                placeholder
                    .clone()
                    .map_or(ServiceMode::Mock, ServiceMode::Live)
            })
            .collect();
        for (number, spanned_turn) in case.value.turns.value.iter().enumerate() {
            let number = number + 1;
            let turn = &spanned_turn.value;
            let request_at = turn
                .request
                .as_ref()
                .map_or(spanned_turn.position, |request| request.position);
            let mut stubs = HashMap::new();
            for (service, answers) in &turn.services {
                let answers: Vec<StubAnswer> = spec::decode_stubs(&answers.value)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|stub| stub_answer(&project.dir, file, answers.position, stub).ok())
                    .collect();
                stubs.insert(service.value.clone(), answers);
            }
            let stubbed: HashSet<String> = stubs.keys().cloned().collect();
            let transport = StubTransport {
                stubs,
                only_stubbed: case.value.only_stubbed.as_ref().is_some_and(|o| o.value),
                attempts: Mutex::new(Vec::new()),
            };
            let classifier = StubClassifier {
                answer: turn
                    .llm
                    .as_ref()
                    .map(|llm| match (&llm.value.error, &llm.value.intent) {
                        (Some(failure), _) => Err(failure.value),
                        (None, Some(intent)) => project
                            .intent_by_name(&intent.value)
                            .map(|id| (id, llm.value.confidence.as_ref().map_or(0.9, |c| c.value)))
                            .ok_or(LlmFailure::Garbage),
                        (None, None) => Err(LlmFailure::Garbage),
                    }),
            };
            let mut from_channel = None;
            let request = match (&turn.channel, &turn.payload, &turn.request) {
                (Some(channel), Some(payload), _) => {
                    match channel_turn(project, &channel.value, &payload.value, number) {
                        Ok(ChannelTurn::Message(channel, message, request)) => {
                            from_channel = Some((channel, *message));
                            *request
                        }
                        Ok(ChannelTurn::Ignored(reason)) => {
                            let expected =
                                turn.expect.as_ref().and_then(|e| e.value.ignored.as_ref());
                            if !expected.is_some_and(|ignored| ignored.value) {
                                result.failures.push(Failure {
                                    turn: number,
                                    position: payload.position,
                                    what: "payload".to_owned(),
                                    expected: "a user's message, which runs a turn".to_owned(),
                                    actual: format!("acknowledged and not run: {reason}"),
                                    path: None,
                                });
                            }
                            continue;
                        }
                        Err(error) => {
                            result.failures.push(Failure {
                                turn: number,
                                position: payload.position,
                                what: "payload".to_owned(),
                                expected: "a payload the channel can read".to_owned(),
                                actual: error,
                                path: None,
                            });
                            return;
                        }
                    }
                }
                (_, _, Some(request_value)) => {
                    let mut body = match request_value.value.to_json() {
                        Json::Object(body) => body,
                        _ => serde_json::Map::new(),
                    };
                    body.entry("user_id")
                        .or_insert_with(|| Json::String(DEFAULT_USER_ID.to_owned()));
                    body.entry("trace_id")
                        .or_insert_with(|| Json::String(format!("test-trace-{number}")));
                    // The request a channel could send: the project's request schema
                    // applies, as in `serve`.
                    let checked = match &project.request_schema {
                        Some(schema) => crate::server::validate_request_body(schema, body),
                        None => Ok(body),
                    };
                    match checked
                        .and_then(|body| crate::server::turn_request(body, &http::HeaderMap::new()))
                    {
                        Ok(request) => request,
                        Err(error) => {
                            result.failures.push(Failure {
                                turn: number,
                                position: request_at,
                                what: "request".to_owned(),
                                expected: "a valid request".to_owned(),
                                actual: error.detail,
                                path: None,
                            });
                            return;
                        }
                    }
                }
                // Refused by `check`.
                _ => return,
            };
            let deps = TurnDeps {
                project,
                modes: &modes,
                classifier: &classifier,
                sessions: &sessions,
                transport: &transport,
                breakers: &breakers,
                deadline: tokio::time::Instant::now() + TURN_TIMEOUT,
            };
            let outcome = match engine::run_turn(&deps, &request).await {
                Ok(outcome) => outcome,
                Err(error) => {
                    result.failures.push(Failure {
                        turn: number,
                        position: request_at,
                        what: "answer".to_owned(),
                        expected: "an answer".to_owned(),
                        actual: format!("the turn failed: {error}"),
                        path: None,
                    });
                    return;
                }
            };
            result.visited.extend(outcome.visited.iter().copied());
            result.routes.insert(outcome.route.clone());
            let attempts = transport
                .attempts
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if case.value.only_stubbed.as_ref().is_some_and(|o| o.value) {
                for (service, _) in &attempts {
                    if !stubbed.contains(service) {
                        result.failures.push(Failure {
                            turn: number,
                            position: request_at,
                            what: "calls".to_owned(),
                            expected: "only stubbed services are called (`only_stubbed: true`)"
                                .to_owned(),
                            actual: format!("`{service}` was called"),
                            path: None,
                        });
                    }
                }
            }
            if let Some(expect) = &turn.expect {
                let session = sessions.load(&request.session_id).await.unwrap_or_default();
                let calls = calls_made(&outcome, &attempts);
                check_expectations(
                    project,
                    &mut result,
                    number,
                    &expect.value,
                    &outcome,
                    &calls,
                    &session.variables,
                );
                if let Some((channel, message)) = &from_channel {
                    check_channel_expectations(
                        project,
                        &mut result,
                        number,
                        &expect.value,
                        (channel, message),
                        &request,
                        &outcome,
                    );
                }
            }
        }
    });
    result.elapsed = started.elapsed();
    result
}

/// A channel turn, read from its payload.
enum ChannelTurn<'p> {
    Message(
        &'p Channel,
        Box<channels::Message>,
        Box<engine::TurnRequest>,
    ),
    /// Not a user's message: why.
    Ignored(&'static str),
}

/// Reads a platform payload as `serve` reads a verified delivery, and
/// takes its first message.
fn channel_turn<'p>(
    project: &'p CompiledProject,
    name: &str,
    payload: &crate::spec::TemplateValue,
    number: usize,
) -> Result<ChannelTurn<'p>, String> {
    let channel = project
        .channel(name)
        .ok_or_else(|| format!("no channel `{name}`"))?;
    let payload = payload.to_json();
    let bytes = match (&channel.kind, &payload) {
        (ChannelKind::Twilio(_), Json::Object(fields)) => {
            let mut form = form_urlencoded::Serializer::new(String::new());
            for (key, value) in fields {
                match value {
                    Json::String(text) => form.append_pair(key, text),
                    other => form.append_pair(key, &other.to_string()),
                };
            }
            form.finish().into_bytes()
        }
        (ChannelKind::Twilio(_), _) => {
            return Err("a Twilio payload is a map of its form fields".to_owned());
        }
        _ => serde_json::to_vec(&payload).map_err(|error| error.to_string())?,
    };
    match channels::read(project, channel, &bytes) {
        Ok(channels::Inbound::Messages(messages)) => match messages.into_iter().next() {
            Some(message) => {
                let request = message.turn_request(name, format!("test-trace-{number}"));
                Ok(ChannelTurn::Message(
                    channel,
                    Box::new(message),
                    Box::new(request),
                ))
            }
            None => Ok(ChannelTurn::Ignored("no message")),
        },
        Ok(channels::Inbound::Ignored(reason)) => Ok(ChannelTurn::Ignored(reason)),
        Ok(channels::Inbound::Challenge { .. }) => Ok(ChannelTurn::Ignored("a handshake")),
        Err(bad) => Err(bad.0),
    }
}

/// `ignored` and `outbound` of a channel turn that ran.
fn check_channel_expectations(
    project: &CompiledProject,
    result: &mut CaseResult,
    turn: usize,
    expect: &spec::Expect,
    (channel, message): (&Channel, &channels::Message),
    request: &engine::TurnRequest,
    outcome: &TurnOutcome,
) {
    let mut fail = |position: Position, what: &str, expected: String, actual: String| {
        result.failures.push(Failure {
            turn,
            position,
            what: what.to_owned(),
            expected,
            actual,
            path: None,
        });
    };
    if let Some(ignored) = &expect.ignored
        && ignored.value
    {
        fail(
            ignored.position,
            "ignored",
            "acknowledged and not run".to_owned(),
            "a turn ran".to_owned(),
        );
    }
    let Some(expected) = &expect.outbound else {
        return;
    };
    let (to, body) = match channels::reply(project, channel, message, request, outcome) {
        Ok(channels::Reply::Api(outbound)) => (outbound.shown_url, outbound.body),
        Ok(channels::Reply::Service { service, body }) => {
            (project.service(service).name.clone(), body)
        }
        Ok(channels::Reply::Json(body)) => (String::new(), body),
        Ok(channels::Reply::TwiML(document)) => (String::new(), Json::String(document)),
        Err(error) => {
            fail(
                expected.position,
                "outbound",
                "a reply to send".to_owned(),
                error,
            );
            return;
        }
    };
    if let Some(expected_to) = &expected.value.to
        && !to.ends_with(expected_to.value.as_str())
    {
        fail(
            expected_to.position,
            "outbound to",
            expected_to.value.clone(),
            to.clone(),
        );
    }
    if let Some(expected_body) = &expected.value.body {
        let expected_body = expected_body.value.to_json();
        if !is_subset(&expected_body, &body) {
            fail(
                expected.position,
                "outbound body",
                pretty(&expected_body),
                pretty(&body),
            );
        }
    }
}

/// One entry per call (not per attempt): the service and the body of its
/// first attempt.
fn calls_made(
    outcome: &TurnOutcome,
    attempts: &[(String, Option<Json>)],
) -> Vec<(String, Option<Json>)> {
    let mut consumed = vec![false; attempts.len()];
    let mut calls = Vec::new();
    for span in &outcome.service_spans {
        let mut body = None;
        let mut taken = 0;
        for (index, (service, attempt_body)) in attempts.iter().enumerate() {
            if taken == span.attempts as usize {
                break;
            }
            if !consumed[index] && *service == span.service {
                consumed[index] = true;
                if taken == 0 {
                    body = attempt_body.clone();
                }
                taken += 1;
            }
        }
        calls.push((span.service.clone(), body));
    }
    calls
}

#[allow(clippy::too_many_arguments)]
fn check_expectations(
    project: &CompiledProject,
    result: &mut CaseResult,
    turn: usize,
    expect: &spec::Expect,
    outcome: &TurnOutcome,
    calls: &[(String, Option<Json>)],
    session: &serde_json::Map<String, Json>,
) {
    let path = outcome
        .visited
        .last()
        .and_then(|index| project.steps.get(*index as usize))
        .map(|step| {
            format!(
                "the flow `{}` answered at {}:{}:{} on route `{}`",
                outcome.flow,
                step.file.display(),
                step.line,
                step.column,
                outcome.route
            )
        });
    let mut fail = |position: Position, what: &str, expected: String, actual: String| {
        result.failures.push(Failure {
            turn,
            position,
            what: what.to_owned(),
            expected,
            actual,
            path: path.clone(),
        });
    };
    let names = [
        ("route", &expect.route, outcome.route.as_str()),
        ("intent", &expect.intent, outcome.intent.as_str()),
        ("flow", &expect.flow, outcome.flow.as_str()),
        ("decision", &expect.decision, outcome.decision.as_str()),
    ];
    for (what, expected, actual) in names {
        if let Some(expected) = expected
            && expected.value != actual
        {
            fail(
                expected.position,
                what,
                expected.value.clone(),
                actual.to_owned(),
            );
        }
    }
    if let Some(reply) = &expect.reply {
        let actual = &outcome.reply_text;
        match &reply.value {
            ReplyExpectation::Exact(expected) => {
                if expected.trim() != actual {
                    fail(
                        reply.position,
                        "reply",
                        expected.trim().to_owned(),
                        actual.clone(),
                    );
                }
            }
            ReplyExpectation::Contains(parts) => {
                for part in parts {
                    if !actual.contains(part.as_str()) {
                        fail(
                            reply.position,
                            "reply contains",
                            part.clone(),
                            actual.clone(),
                        );
                    }
                }
            }
            ReplyExpectation::Matches(pattern) => {
                let matches = regex::Regex::new(pattern).is_ok_and(|regex| regex.is_match(actual));
                if !matches {
                    fail(
                        reply.position,
                        "reply matches",
                        pattern.clone(),
                        actual.clone(),
                    );
                }
            }
        }
    }
    if let Some(expected_calls) = &expect.calls {
        let expected_services: Vec<&str> = expected_calls
            .value
            .iter()
            .map(|c| c.value.service.value.as_str())
            .collect();
        let actual_services: Vec<&str> =
            calls.iter().map(|(service, _)| service.as_str()).collect();
        if expected_services != actual_services {
            fail(
                expected_calls.position,
                "calls",
                format!("{expected_services:?}"),
                format!("{actual_services:?}"),
            );
        } else {
            for (expected, (_, body)) in expected_calls.value.iter().zip(calls) {
                if let Some(expected_body) = &expected.value.body {
                    let expected_body = expected_body.value.to_json();
                    let actual = body.clone().unwrap_or(Json::Null);
                    if !is_subset(&expected_body, &actual) {
                        fail(
                            expected.position,
                            &format!("body of the call to `{}`", expected.value.service.value),
                            pretty(&expected_body),
                            pretty(&actual),
                        );
                    }
                }
            }
        }
    }
    if let Some(expected_session) = &expect.session {
        let expected = expected_session.value.to_json();
        let actual = Json::Object(session.clone());
        if !is_subset(&expected, &actual) {
            fail(
                expected_session.position,
                "session",
                pretty(&expected),
                pretty(&actual),
            );
        }
    }
}

fn pretty(value: &Json) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

/// Whether every field of `expected` is in `actual` with an equal value;
/// lists must have the same length, numbers compare by value.
pub fn is_subset(expected: &Json, actual: &Json) -> bool {
    match (expected, actual) {
        (Json::Object(expected), Json::Object(actual)) => expected.iter().all(|(key, value)| {
            actual
                .get(key)
                .is_some_and(|actual| is_subset(value, actual))
        }),
        (Json::Array(expected), Json::Array(actual)) => {
            expected.len() == actual.len()
                && expected.iter().zip(actual).all(|(e, a)| is_subset(e, a))
        }
        (Json::Number(expected), Json::Number(actual)) => expected.as_f64() == actual.as_f64(),
        _ => expected == actual,
    }
}

/// Steps and routes of the project that no case reached.
#[derive(Debug, Clone)]
pub struct Coverage {
    pub steps_total: usize,
    pub unreached_steps: Vec<crate::project::StepSource>,
    pub routes_total: usize,
    pub unreached_routes: Vec<String>,
}

pub fn coverage(project: &CompiledProject, report: &Report) -> Coverage {
    let visited: BTreeSet<u32> = report
        .cases
        .iter()
        .flat_map(|c| c.visited.iter().copied())
        .collect();
    let routes: BTreeSet<&str> = report
        .cases
        .iter()
        .flat_map(|c| c.routes.iter().map(String::as_str))
        .collect();
    Coverage {
        steps_total: project.steps.len(),
        unreached_steps: project
            .steps
            .iter()
            .enumerate()
            .filter(|(index, _)| !visited.contains(&(*index as u32)))
            .map(|(_, step)| step.clone())
            .collect(),
        routes_total: project.routes.len(),
        unreached_routes: project
            .routes
            .iter()
            .filter(|route| !routes.contains(route.as_str()))
            .cloned()
            .collect(),
    }
}
