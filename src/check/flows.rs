//! Flows: their triggers, their steps and what each step may read.
//!
//! Steps are walked in order with a `Scope`: the step results visible at
//! that point, each with the response schema of the service it called. A
//! branch gets a copy of the scope; what a step defines stays visible after
//! it only when the step surely ran. The walk also tracks whether every path
//! replies.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use serde_json::Value as Json;

use crate::diagnostic::{Code, Diagnostic, Location, did_you_mean};
use crate::load;
use crate::project::{self, Decision, FlowId, IntentId, ServiceId};
use crate::spec::{self, Name, Position, Spanned};

use super::{Checker, Defined};

/// Context variables every template may read.
pub(super) const BASE_VARIABLES: &[&str] = &[
    "text",
    "user_id",
    "channel",
    "session_id",
    "trace_id",
    "tenant",
    "input",
    "intent",
    "session",
];

/// What a name in a template refers to, at one point of a flow.
#[derive(Clone)]
pub(super) enum Binding {
    /// The validated response of a call; paths are checked against the schema.
    Response(Option<Arc<Json>>),
    /// A value whose shape is not known statically.
    Any,
}

#[derive(Clone, Default)]
pub(super) struct Scope {
    pub(super) bindings: Vec<(String, Binding)>,
    pub(super) in_on_error: bool,
}

impl Scope {
    pub(super) fn get(&self, name: &str) -> Option<&Binding> {
        self.bindings
            .iter()
            .rev()
            .find(|(bound, _)| bound == name)
            .map(|(_, binding)| binding)
    }

    fn define(&mut self, name: &str, binding: Binding) {
        self.bindings.push((name.to_owned(), binding));
    }
}

/// Facts about the flow being checked.
pub(super) struct FlowFacts<'s> {
    file: &'s Path,
    pub(super) name: &'s str,
    /// Every step id anywhere in the flow.
    pub(super) step_ids: HashSet<String>,
    /// Entity names of the intents that trigger the flow; `None` when unknown.
    pub(super) entities: Option<BTreeSet<String>>,
    /// The input schema of the flow's tool: paths into `input` must exist
    /// in it.
    pub(super) tool_input: Option<Arc<Json>>,
}

/// The compiled form of a step list, and whether every path through it replies.
struct CompiledSteps {
    steps: Vec<project::Step>,
    replies: bool,
}

/// The flow each intent triggers, with the flow's definition.
type FlowOfIntent<'s> = HashMap<IntentId, (FlowId, &'s Defined<'s, spec::Flow>)>;

impl Checker<'_> {
    /// Compiles every flow, and records which flow each intent triggers; an
    /// intent triggers one flow at most.
    pub(super) fn compile_flows<'s>(
        &mut self,
        flows: &'s [Defined<'s, spec::Flow>],
        intent_ids: &HashMap<&str, IntentId>,
        compiled_intents: &[project::Intent],
        service_ids: &HashMap<&str, ServiceId>,
        compiled_services: &[Option<project::Service>],
    ) -> (Vec<Option<project::Flow>>, FlowOfIntent<'s>) {
        let mut flow_of_intent: FlowOfIntent<'s> = HashMap::new();
        let mut compiled_flows = Vec::new();
        for (index, flow) in flows.iter().enumerate() {
            let flow_id = FlowId(index as u32);
            let triggers = self.flow_triggers(flow, intent_ids);
            for (intent_name, intent_id) in &triggers {
                if let Some((_, first)) = flow_of_intent.get(intent_id) {
                    let related = self.location(first.file, first.name, first.name.value.len());
                    let location = self.location(flow.file, intent_name, intent_name.value.len());
                    self.push(
                        Diagnostic::error(
                            Code::IntentWithSeveralFlows,
                            location,
                            format!(
                                "intent `{}` already triggers flow `{}`",
                                intent_name.value, first.name.value
                            ),
                        )
                        .with_related(related, "the flow it already triggers")
                        .with_hint(
                            "an intent triggers one flow; use `if` or `switch` inside it to branch",
                        ),
                    );
                } else {
                    flow_of_intent.insert(*intent_id, (flow_id, flow));
                }
            }
            let entities = if triggers.is_empty() {
                None
            } else {
                Some(
                    triggers
                        .iter()
                        .flat_map(|(_, id)| compiled_intents[id.0 as usize].entities.iter())
                        .map(|entity| entity.name.clone())
                        .collect(),
                )
            };
            let first_intent = triggers.first().map(|(_, id)| *id);
            compiled_flows.push(self.compile_flow(
                flow,
                entities,
                first_intent,
                service_ids,
                compiled_services,
            ));
        }
        self.check_tool_names(flows);
        (compiled_flows, flow_of_intent)
    }

    /// The flow each intent runs, by intent id: the flow it triggers, else
    /// the fallback intent's.
    pub(super) fn flow_for_intent(
        &mut self,
        intents: &[Defined<'_, spec::Intent>],
        classifier: Option<&project::Classifier>,
        flow_of_intent: &FlowOfIntent<'_>,
    ) -> Vec<FlowId> {
        let mut flow_for_intent = Vec::with_capacity(intents.len());
        let fallback_flow = classifier
            .and_then(|classifier| flow_of_intent.get(&classifier.fallback))
            .map(|(flow_id, _)| *flow_id);
        if let (Some(classifier), None, true) = (classifier, fallback_flow, self.complete) {
            let fallback = &intents[classifier.fallback.0 as usize];
            let location = self.location(fallback.file, fallback.name, fallback.name.value.len());
            self.push(
                Diagnostic::error(
                    Code::MissingFallback,
                    location,
                    format!(
                        "the fallback intent `{}` has no flow, so unrecognised messages have nowhere to go",
                        fallback.name.value
                    ),
                )
                .with_hint(format!("add a flow with `intent: {}`", fallback.name.value)),
            );
        }
        for (index, intent) in intents.iter().enumerate() {
            let id = IntentId(index as u32);
            match flow_of_intent.get(&id) {
                Some((flow_id, _)) => flow_for_intent.push(*flow_id),
                None => {
                    if self.complete && classifier.is_some_and(|c| c.fallback != id) {
                        let location =
                            self.location(intent.file, intent.name, intent.name.value.len());
                        self.push(
                            Diagnostic::warning(
                                Code::IntentWithoutFlow,
                                location,
                                format!(
                                    "no flow is triggered by intent `{}`; it runs the fallback flow",
                                    intent.name.value
                                ),
                            )
                            .with_hint(format!("add a flow with `intent: {}`", intent.name.value)),
                        );
                    }
                    flow_for_intent.push(fallback_flow.unwrap_or(FlowId(0)));
                }
            }
        }
        flow_for_intent
    }

    fn flow_triggers<'s>(
        &mut self,
        flow: &Defined<'s, spec::Flow>,
        intent_ids: &HashMap<&str, IntentId>,
    ) -> Vec<(&'s Name, IntentId)> {
        let spec = flow.spec;
        let mut names: Vec<&Name> = Vec::new();
        match (&spec.intent, &spec.intents) {
            (Some(intent), None) => names.push(intent),
            (None, Some(intents)) => names.extend(intents.value.iter()),
            (Some(intent), Some(_)) => {
                let location = self.location(flow.file, intent, intent.value.len());
                self.error(
                    Code::MisplacedKey,
                    location,
                    format!(
                        "flow `{}` has both `intent` and `intents`; keep one",
                        flow.name.value
                    ),
                );
            }
            // A tool-only flow is run by agents, not by intents.
            (None, None) if spec.tool.is_some() => {}
            (None, None) => {
                let location = self.location(flow.file, flow.name, flow.name.value.len());
                self.push(
                    Diagnostic::warning(
                        Code::FlowWithoutIntent,
                        location,
                        format!(
                            "flow `{}` has no `intent`, so nothing runs it",
                            flow.name.value
                        ),
                    )
                    .with_hint("add `intent: <name>` (or `intents: [a, b]`), or remove the flow"),
                );
            }
        }
        names
            .into_iter()
            .filter_map(|name| {
                self.resolve(flow.file, name, intent_ids, "intent", Code::UnknownIntent)
                    .map(|id| (name, id))
            })
            .collect()
    }

    fn compile_flow(
        &mut self,
        flow: &Defined<'_, spec::Flow>,
        entities: Option<BTreeSet<String>>,
        first_intent: Option<IntentId>,
        service_ids: &HashMap<&str, ServiceId>,
        services: &[Option<project::Service>],
    ) -> Option<project::Flow> {
        let spec = flow.spec;
        let tool = spec.tool.as_ref().map(|tool| {
            self.compile_tool(
                flow.file,
                &flow.name.value,
                tool,
                first_intent,
                entities.iter().flatten().cloned().collect(),
            )
        });
        let mut step_ids = HashSet::new();
        let mut first_id: HashMap<String, Position> = HashMap::new();
        let mut all_steps: Vec<&spec::Step> = Vec::new();
        collect_steps(&spec.steps.value, &mut all_steps);
        if let Some(on_error) = &spec.on_error {
            collect_steps(std::slice::from_ref(on_error.as_ref()), &mut all_steps);
        }
        for step in &all_steps {
            if let Some(id) = &step.id {
                if let Some(first) = first_id.get(&id.value) {
                    let related = Location::new(flow.file, *first, id.value.len());
                    let location = self.location(flow.file, id, id.value.len());
                    self.push(
                        Diagnostic::error(
                            Code::DuplicateName,
                            location,
                            format!(
                                "step id `{}` is used twice in flow `{}`",
                                id.value, flow.name.value
                            ),
                        )
                        .with_related(related, "first used here"),
                    );
                } else {
                    first_id.insert(id.value.clone(), id.position);
                }
                if BASE_VARIABLES.contains(&id.value.as_str()) || id.value == "error" {
                    let location = self.location(flow.file, id, id.value.len());
                    self.error(
                        Code::InvalidValue,
                        location,
                        format!(
                            "step id `{}` would hide the context variable of that name",
                            id.value
                        ),
                    );
                }
                step_ids.insert(id.value.clone());
            }
        }
        let facts = FlowFacts {
            file: flow.file,
            name: &flow.name.value,
            step_ids,
            entities,
            tool_input: tool
                .as_ref()
                .and_then(|tool| Some(tool.as_ref()?.schema.clone())),
        };
        let mut scope = Scope::default();
        let steps =
            self.compile_steps(&spec.steps.value, &mut scope, &facts, service_ids, services);
        if !steps.replies {
            let location = self.location(flow.file, flow.name, flow.name.value.len());
            self.push(
                Diagnostic::error(
                    Code::MissingReply,
                    location,
                    format!("flow `{}` can end without a reply", flow.name.value),
                )
                .with_hint(
                    "end every path with a `reply` step (an `if` without `else` may be skipped)",
                ),
            );
        }
        let on_error = spec.on_error.as_ref().map(|on_error| {
            let mut scope = Scope {
                in_on_error: true,
                ..Scope::default()
            };
            self.compile_on_error(on_error, &mut scope, &facts, service_ids, services)
        });
        Some(project::Flow {
            name: flow.name.value.clone(),
            steps: steps.steps,
            on_error: match on_error {
                Some(compiled) => Some(compiled?),
                None => None,
            },
            tool: match tool {
                Some(compiled) => Some(compiled?.tool),
                None => None,
            },
        })
    }

    fn compile_on_error(
        &mut self,
        on_error: &Spanned<spec::Step>,
        scope: &mut Scope,
        facts: &FlowFacts<'_>,
        service_ids: &HashMap<&str, ServiceId>,
        services: &[Option<project::Service>],
    ) -> Option<Vec<project::Step>> {
        scope.in_on_error = true;
        let compiled = self.compile_steps(
            std::slice::from_ref(on_error),
            scope,
            facts,
            service_ids,
            services,
        );
        if !compiled.replies {
            self.push(
                Diagnostic::error(
                    Code::MissingReply,
                    Location::new(facts.file, on_error.position, 1),
                    "`on_error` can end without a reply",
                )
                .with_hint("give `on_error` a `reply` (and a `route`), e.g. `on_error: { reply: \"...\", route: x_error }`"),
            );
        }
        Some(compiled.steps)
    }

    fn compile_steps(
        &mut self,
        steps: &[Spanned<spec::Step>],
        scope: &mut Scope,
        facts: &FlowFacts<'_>,
        service_ids: &HashMap<&str, ServiceId>,
        services: &[Option<project::Service>],
    ) -> CompiledSteps {
        let mut compiled = Vec::new();
        let mut replies = false;
        let mut warned = false;
        for step in steps {
            if replies && !warned {
                warned = true;
                self.push(
                    Diagnostic::warning(
                        Code::UnreachableStep,
                        Location::new(facts.file, step.position, 1),
                        "this step can never run: every path before it has replied",
                    )
                    .with_hint("remove it, or put an `if` on the reply before it"),
                );
            }
            match self.compile_step(step, scope, facts, service_ids, services) {
                Some((step, step_replies)) => {
                    compiled.push(step);
                    replies |= step_replies;
                }
                // Already reported; an unconditional reply still ends the
                // path, so the flow is not reported again as missing one.
                None => replies |= step.value.reply.is_some() && step.value.condition.is_none(),
            }
        }
        CompiledSteps {
            steps: compiled,
            replies,
        }
    }

    /// Compiles one step; returns it and whether it always replies.
    fn compile_step(
        &mut self,
        step: &Spanned<spec::Step>,
        scope: &mut Scope,
        facts: &FlowFacts<'_>,
        service_ids: &HashMap<&str, ServiceId>,
        services: &[Option<project::Service>],
    ) -> Option<(project::Step, bool)> {
        let spec = &step.value;
        let file = facts.file;
        let kinds: Vec<&str> = [
            ("call", spec.call.is_some()),
            ("reply", spec.reply.is_some()),
            ("set", spec.set.is_some()),
            ("then", spec.then.is_some()),
            ("switch", spec.switch.is_some()),
            ("parallel", spec.parallel.is_some()),
            ("foreach", spec.foreach.is_some()),
        ]
        .into_iter()
        .filter_map(|(kind, present)| present.then_some(kind))
        .collect();
        let kind = match kinds.as_slice() {
            [kind] => *kind,
            [] => {
                self.push(
                    Diagnostic::error(
                        Code::StepKind,
                        Location::new(file, step.position, 1),
                        "this step does nothing",
                    )
                    .with_hint("a step needs one of `call`, `reply`, `set`, `then`, `switch`, `parallel`, `foreach`"),
                );
                return None;
            }
            several => {
                self.push(
                    Diagnostic::error(
                        Code::StepKind,
                        Location::new(file, step.position, 1),
                        format!(
                            "a step does one thing, this one has {}",
                            several
                                .iter()
                                .map(|k| format!("`{k}`"))
                                .collect::<Vec<_>>()
                                .join(" and ")
                        ),
                    )
                    .with_hint("split it into one step per action"),
                );
                return None;
            }
        };
        self.misplaced_keys(file, step, kind);

        let condition = spec.condition.as_ref().and_then(|condition| {
            self.compile_expression(file, condition, &condition.value, scope, facts)
        });
        let condition_failed = spec.condition.is_some() && condition.is_none();

        // `else` runs with the scope from before the step.
        let otherwise = spec.otherwise.as_ref().map(|otherwise| {
            let mut branch_scope = scope.clone();
            self.compile_steps(
                &otherwise.value,
                &mut branch_scope,
                facts,
                service_ids,
                services,
            )
        });
        let otherwise_replies = otherwise.as_ref().is_some_and(|o| o.replies);

        let mut action_scope = scope.clone();
        let (action, action_replies) = match kind {
            "call" => {
                let (call, binding) =
                    self.compile_call(spec, &mut action_scope, facts, service_ids, services)?;
                if let Some(id) = &spec.id {
                    action_scope.define(&id.value, binding);
                }
                (project::Action::Call(call), false)
            }
            "reply" => (
                project::Action::Reply(self.compile_reply(spec, &action_scope, facts)?),
                true,
            ),
            "set" => {
                let mut values = Vec::new();
                let mut ok = true;
                for (name, value) in spec.set.iter().flat_map(|set| set.value.iter()) {
                    match self.compile_value(file, value, &action_scope, facts) {
                        Some(value) => values.push((name.value.clone(), value)),
                        None => ok = false,
                    }
                }
                if !ok {
                    return None;
                }
                (project::Action::Set(values), false)
            }
            "then" => {
                let then = spec.then.as_ref()?;
                let nested = self.compile_steps(
                    &then.value,
                    &mut action_scope,
                    facts,
                    service_ids,
                    services,
                );
                (project::Action::Then(nested.steps), nested.replies)
            }
            "switch" => {
                let expression = spec.switch.as_ref()?;
                let value = self.compile_expression(
                    file,
                    expression,
                    &expression.value,
                    &action_scope,
                    facts,
                );
                let mut cases = Vec::new();
                let mut all_reply = true;
                for (case, steps) in spec.cases.iter().flat_map(|cases| cases.value.iter()) {
                    let mut case_scope = action_scope.clone();
                    let compiled = self.compile_steps(
                        &steps.value,
                        &mut case_scope,
                        facts,
                        service_ids,
                        services,
                    );
                    all_reply &= compiled.replies;
                    cases.push((case.value.clone(), compiled.steps));
                }
                if spec.cases.is_none() {
                    self.push(
                        Diagnostic::error(
                            Code::MissingKey,
                            Location::new(file, expression.position, expression.value.len()),
                            "`switch` needs `cases`",
                        )
                        .with_hint("cases: { value: [steps], other: [steps] }"),
                    );
                }
                let default = match &spec.default {
                    Some(default) => {
                        let mut default_scope = action_scope.clone();
                        let compiled = self.compile_steps(
                            &default.value,
                            &mut default_scope,
                            facts,
                            service_ids,
                            services,
                        );
                        all_reply &= compiled.replies;
                        compiled.steps
                    }
                    None => {
                        all_reply = false;
                        Vec::new()
                    }
                };
                (
                    project::Action::Switch(project::Switch {
                        value: value?,
                        cases,
                        default,
                    }),
                    all_reply,
                )
            }
            "parallel" => {
                let branches = spec.parallel.as_ref()?;
                let mut calls = Vec::new();
                let mut bindings = Vec::new();
                for branch in &branches.value {
                    let branch_spec = &branch.value;
                    if branch_spec.call.is_none() || branch_spec.id.is_none() {
                        self.push(
                            Diagnostic::error(
                                Code::StepKind,
                                Location::new(file, branch.position, 1),
                                "each `parallel` branch is a `call` with an `id`",
                            )
                            .with_hint("- id: menu\n  call: menu"),
                        );
                        continue;
                    }
                    // Branches run at the same time: none sees another's result.
                    let mut branch_scope = action_scope.clone();
                    if let Some((compiled, _)) =
                        self.compile_step(branch, &mut branch_scope, facts, service_ids, services)
                    {
                        if let (Some(id), Some(binding)) = (
                            &branch_spec.id,
                            branch_scope.get(&branch_spec.id.as_ref()?.value),
                        ) {
                            bindings.push((id.value.clone(), binding.clone()));
                        }
                        calls.push(compiled);
                    }
                }
                for (id, binding) in bindings {
                    action_scope.define(&id, binding);
                }
                (project::Action::Parallel(calls), false)
            }
            "foreach" => {
                let list_text = spec.foreach.as_ref()?;
                let list = self.compile_expression(
                    file,
                    list_text,
                    &list_text.value,
                    &action_scope,
                    facts,
                );
                let binding = spec
                    .binding
                    .as_ref()
                    .map_or_else(|| "item".to_owned(), |name| name.value.clone());
                let mut body_scope = action_scope.clone();
                body_scope.define(&binding, Binding::Any);
                let steps = match &spec.each {
                    Some(steps) => {
                        self.compile_steps(
                            &steps.value,
                            &mut body_scope,
                            facts,
                            service_ids,
                            services,
                        )
                        .steps
                    }
                    None => {
                        self.push(Diagnostic::error(
                            Code::MissingKey,
                            Location::new(file, list_text.position, list_text.value.len()),
                            "`foreach` needs `do`: the steps to run for each element",
                        ));
                        Vec::new()
                    }
                };
                if let Some(id) = &spec.id {
                    action_scope.define(&id.value, Binding::Any);
                }
                (
                    project::Action::Foreach(project::Foreach {
                        list: list?,
                        binding,
                        steps,
                    }),
                    false,
                )
            }
            _ => return None,
        };
        if condition_failed {
            return None;
        }

        let replies = if spec.condition.is_some() {
            action_replies && otherwise_replies
        } else {
            action_replies
        };
        // What the step defined is visible after it only when the step
        // certainly ran: unconditionally, or with an `else` that replies.
        if spec.condition.is_none() || otherwise_replies {
            *scope = action_scope;
        }
        let source = project::StepSource {
            file: file.to_path_buf(),
            line: step.position.line,
            column: step.position.column,
        };
        let index = u32::try_from(self.step_sources.len()).unwrap_or(u32::MAX);
        self.step_sources.push(source.clone());
        Some((
            project::Step {
                index,
                id: spec.id.as_ref().map(|id| id.value.clone()),
                condition,
                otherwise: otherwise.map(|o| o.steps).unwrap_or_default(),
                action,
                source,
            },
            replies,
        ))
    }

    /// Keys that belong to another kind of step.
    fn misplaced_keys(&mut self, file: &Path, step: &Spanned<spec::Step>, kind: &str) {
        let spec = &step.value;
        let mut misplaced: Vec<(&str, Position, &str)> = Vec::new();
        let mut note = |key: &'static str, position: Option<Position>, owner: &'static str| {
            if let Some(position) = position
                && owner != kind
            {
                misplaced.push((key, position, owner));
            }
        };
        note("body", spec.body.as_ref().map(|v| v.position), "call");
        note(
            "on_error",
            spec.on_error.as_ref().map(|v| v.position),
            "call",
        );
        note("route", spec.route.as_ref().map(|v| v.position), "reply");
        note("data", spec.data.as_ref().map(|v| v.position), "reply");
        note(
            "decision",
            spec.decision.as_ref().map(|v| v.position),
            "reply",
        );
        note("cases", spec.cases.as_ref().map(|v| v.position), "switch");
        note(
            "default",
            spec.default.as_ref().map(|v| v.position),
            "switch",
        );
        note("as", spec.binding.as_ref().map(|v| v.position), "foreach");
        note("do", spec.each.as_ref().map(|v| v.position), "foreach");
        if let Some(id) = &spec.id
            && !matches!(kind, "call" | "foreach")
        {
            misplaced.push(("id", id.position, "call` or `foreach"));
        }
        for (key, position, owner) in misplaced {
            self.push(
                Diagnostic::error(
                    Code::MisplacedKey,
                    Location::new(file, position, 1),
                    format!("`{key}` belongs to a `{owner}` step, not to a `{kind}` step"),
                )
                .with_hint(format!("remove `{key}`, or make this a `{owner}` step")),
            );
        }
        if let (Some(otherwise), None) = (&spec.otherwise, &spec.condition) {
            self.push(
                Diagnostic::error(
                    Code::MisplacedKey,
                    Location::new(file, otherwise.position, 1),
                    "`else` without `if`",
                )
                .with_hint("add an `if:` condition to this step, or remove `else`"),
            );
        }
    }

    fn compile_call(
        &mut self,
        spec: &spec::Step,
        scope: &mut Scope,
        facts: &FlowFacts<'_>,
        service_ids: &HashMap<&str, ServiceId>,
        services: &[Option<project::Service>],
    ) -> Option<(project::Call, Binding)> {
        let file = facts.file;
        let name = spec.call.as_ref()?;
        let service = self.resolve(file, name, service_ids, "service", Code::UnknownService);
        let body = spec
            .body
            .as_ref()
            .map(|body| self.compile_value(file, body, scope, facts));
        let on_error = match &spec.on_error {
            Some(on_error) => {
                let mut error_scope = scope.clone();
                Some(self.compile_on_error(
                    on_error,
                    &mut error_scope,
                    facts,
                    service_ids,
                    services,
                ))
            }
            None => None,
        };
        let _ = services;
        let schema = self
            .service_schema_files
            .get(&name.value)
            .and_then(|file| self.schemas.get(file))
            .and_then(Option::as_ref)
            .map(|schema| schema.json.clone());
        let service = service?;
        Some((
            project::Call {
                service,
                body: match body {
                    Some(body) => Some(body?),
                    None => None,
                },
                on_error: match on_error {
                    Some(on_error) => Some(on_error?),
                    None => None,
                },
            },
            Binding::Response(schema),
        ))
    }

    fn compile_reply(
        &mut self,
        spec: &spec::Step,
        scope: &Scope,
        facts: &FlowFacts<'_>,
    ) -> Option<project::Reply> {
        let file = facts.file;
        let text = spec.reply.as_ref()?;
        let template = self.compile_text(file, text, scope, facts);
        let data = match &spec.data {
            Some(data) => Some(self.compile_value(file, data, scope, facts)?),
            None => None,
        };
        let decision = match &spec.decision {
            None if scope.in_on_error => Decision::Error,
            None => Decision::Reply,
            Some(name) => match Decision::from_name(&name.value) {
                Some(decision) => decision,
                None => {
                    self.push(unknown_decision(file, name));
                    return None;
                }
            },
        };
        let route = spec
            .route
            .as_ref()
            .map_or_else(|| facts.name.to_owned(), |route| route.value.clone());
        self.routes.insert(route.clone());
        Some(project::Reply {
            text: template?,
            route,
            data,
            decision,
        })
    }

    pub(super) fn compile_defaults(
        &mut self,
        defaults: Option<(&Path, &Spanned<spec::Defaults>)>,
    ) -> Option<project::Defaults> {
        let scope = Scope {
            in_on_error: true,
            ..Scope::default()
        };
        let error_reply =
            match defaults.and_then(|(file, d)| Some((file, d.value.error_reply.as_ref()?))) {
                Some((file, text)) => {
                    let facts = FlowFacts {
                        file,
                        name: "defaults",
                        step_ids: HashSet::new(),
                        entities: None,
                        tool_input: None,
                    };
                    self.compile_text(file, text, &scope, &facts)?
                }
                None => match self.templates.add_template(project::DEFAULT_ERROR_REPLY) {
                    Ok((id, _)) => id,
                    Err(error) => {
                        self.error(
                            Code::TemplateSyntax,
                            Location::file(load::FLOWS_DIR),
                            error.to_string(),
                        );
                        return None;
                    }
                },
            };
        Some(project::Defaults {
            error_reply,
            error_route: defaults
                .and_then(|(_, d)| d.value.error_route.as_ref())
                .map(|route| route.value.clone()),
        })
    }
}

pub(super) fn collect_steps<'s>(steps: &'s [Spanned<spec::Step>], out: &mut Vec<&'s spec::Step>) {
    for step in steps {
        let spec = &step.value;
        out.push(spec);
        let nested = [
            &spec.otherwise,
            &spec.then,
            &spec.default,
            &spec.parallel,
            &spec.each,
        ];
        for list in nested.into_iter().flatten() {
            collect_steps(&list.value, out);
        }
        if let Some(cases) = &spec.cases {
            for steps in cases.value.values() {
                collect_steps(&steps.value, out);
            }
        }
        if let Some(on_error) = &spec.on_error {
            collect_steps(std::slice::from_ref(on_error.as_ref()), out);
        }
    }
}

/// A `decision` outside the closed set, with the closest known value.
fn unknown_decision(file: &Path, name: &spec::Name) -> Diagnostic {
    let known = Decision::ALL.map(Decision::as_str);
    Diagnostic::error(
        Code::UnknownDecision,
        Location::new(file, name.position, name.value.chars().count()),
        format!(
            "unknown decision `{}`: a decision is one of {}",
            name.value,
            known.map(|name| format!("`{name}`")).join(", ")
        ),
    )
    .with_optional_hint(did_you_mean(&name.value, known))
}
