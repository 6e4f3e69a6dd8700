//! Intent classification: the `Classifier` trait, the rule classifier, and
//! the LLM classifier that falls back to the rules on any failure.
//!
//! Knows nothing about HTTP routes; takes a compiled project and the user's
//! text, returns an intent id, a confidence and the entities found.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage,
    ChatCompletionRequestUserMessage, CreateChatCompletionRequest, ResponseFormat,
    ResponseFormatJsonSchema,
};
use futures_util::future::BoxFuture;
use serde::Deserialize;

use crate::project::{CompiledProject, IntentId};

pub mod model;

/// Where a classification came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Rules,
    Llm,
    /// No classification: an MCP tool call names its flow.
    Tool,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Rules => "rules",
            Source::Llm => "llm",
            Source::Tool => "tool",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Classification {
    pub intent: IntentId,
    /// 0.0 to 1.0.
    pub confidence: f64,
    /// Entity name → value, for the entities of `intent` found in the text.
    pub entities: BTreeMap<String, String>,
    pub source: Source,
    /// Why the LLM was not used, when it was configured but failed.
    pub fallback_reason: Option<String>,
}

/// Classifies user text into one of the project's intents.
pub trait Classifier: Send + Sync {
    fn classify<'a>(
        &'a self,
        project: &'a CompiledProject,
        text: &'a str,
    ) -> BoxFuture<'a, Classification>;
}

/// Keyword rules: whole words, case-insensitive, most specific match wins.
#[derive(Debug, Default, Clone, Copy)]
pub struct RuleClassifier;

impl Classifier for RuleClassifier {
    fn classify<'a>(
        &'a self,
        project: &'a CompiledProject,
        text: &'a str,
    ) -> BoxFuture<'a, Classification> {
        Box::pin(async move { classify_by_rules(project, text) })
    }
}

/// Lower-cases and reduces the text to words separated by single spaces,
/// with a space at each end, so a keyword matches as ` word `.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push(' ');
    let mut last_was_space = true;
    for character in text.chars() {
        if character.is_alphanumeric() || character == '\'' || character == '’' {
            let character = if character == '’' { '\'' } else { character };
            out.extend(character.to_lowercase());
            last_was_space = false;
        } else if !last_was_space {
            out.push(' ');
            last_was_space = true;
        }
    }
    if !last_was_space {
        out.push(' ');
    }
    out
}

/// Confidence for a match of `words` words: one word 0.7, two 0.85, three
/// or more 0.95. A match is evidence, never certainty.
fn confidence_for(words: usize) -> f64 {
    match words {
        0 => 0.0,
        1 => 0.7,
        2 => 0.85,
        _ => 0.95,
    }
}

/// The offline classification: the model learned from the examples, and
/// the keywords (whole words, the most specific match wins), which decide
/// unless the match is short and the model is sure of another intent;
/// below `min_confidence` the fallback intent runs.
pub fn classify_by_rules(project: &CompiledProject, text: &str) -> Classification {
    let (intent, confidence) = project.classifier.offline(text);
    finish(project, text, intent, confidence, Source::Rules, None)
}

impl crate::project::Classifier {
    /// The offline choice for `text` and its confidence, before
    /// `min_confidence` applies.
    pub fn offline(&self, text: &str) -> (IntentId, f64) {
        let normalized = normalize(text);
        match self.keywords.best_match(&normalized) {
            // A keyword of three words or more decides alone: the model is
            // not asked.
            Some((intent, words)) if words > MODEL_OVERRULES_WORDS => {
                (intent, confidence_for(words))
            }
            // A short keyword (one or two words: "order", "my profile") says
            // little when the model is sure of another intent ("is my order
            // ready" is tracking).
            Some((intent, words)) => {
                match self
                    .model
                    .overruling(text, intent, MODEL_OVERRULES_CONFIDENCE)
                {
                    Some(prediction) => (prediction.intent, prediction.confidence),
                    None => (intent, confidence_for(words)),
                }
            }
            None => match self.model.predict(text) {
                Some(prediction) => (prediction.intent, prediction.confidence),
                None => (self.fallback, 0.0),
            },
        }
    }

    /// The intent the rules run for `text`: the offline choice, or the
    /// fallback intent below `min_confidence`.
    pub fn offline_intent(&self, text: &str) -> (IntentId, f64) {
        let (intent, confidence) = self.offline(text);
        (self.sure_enough(intent, confidence), confidence)
    }

    /// `intent`, or the fallback intent when `confidence` is below
    /// `min_confidence`, whichever classifier chose it.
    pub fn sure_enough(&self, intent: IntentId, confidence: f64) -> IntentId {
        if confidence < self.min_confidence {
            self.fallback
        } else {
            intent
        }
    }
}

/// Why the rules chose what they chose for `text`, in words, for the
/// console: the keyword that matched (and whether the model overruled it),
/// or the model's best guess, and whether `min_confidence` sent the turn to
/// the fallback intent. Recomputed on demand: the hot path keeps no trace.
pub fn explain_rules(project: &CompiledProject, text: &str) -> String {
    let classifier = &project.classifier;
    let normalized = normalize(text);
    let (why, intent, confidence) = match classifier.keywords.best_match(&normalized) {
        Some((intent, words)) => {
            let keyword = project
                .intent(intent)
                .keywords
                .iter()
                .filter(|keyword| keyword.split(' ').count() == words)
                .find(|keyword| normalized.contains(&format!(" {keyword} ")))
                .map_or_else(String::new, |keyword| format!(" `{keyword}`"));
            let overruled = (words <= MODEL_OVERRULES_WORDS)
                .then(|| {
                    classifier
                        .model
                        .overruling(text, intent, MODEL_OVERRULES_CONFIDENCE)
                })
                .flatten();
            match overruled {
                Some(prediction) => (
                    format!(
                        "keyword{keyword} of `{}` overruled by the model, sure of `{}`",
                        project.intent(intent).name,
                        project.intent(prediction.intent).name
                    ),
                    prediction.intent,
                    prediction.confidence,
                ),
                None => (
                    format!("keyword{keyword} of `{}`", project.intent(intent).name),
                    intent,
                    confidence_for(words),
                ),
            }
        }
        None => match classifier.model.predict(text) {
            Some(prediction) => (
                format!(
                    "no keyword; the model's best guess is `{}`",
                    project.intent(prediction.intent).name
                ),
                prediction.intent,
                prediction.confidence,
            ),
            None => (
                "no keyword, and nothing like the examples".to_owned(),
                classifier.fallback,
                0.0,
            ),
        },
    };
    if classifier.sure_enough(intent, confidence) == intent {
        format!("{why} ({confidence:.2})")
    } else {
        format!(
            "{why} ({confidence:.2}), below min_confidence {:.2}: the fallback intent `{}`",
            classifier.min_confidence,
            project.intent(classifier.fallback).name
        )
    }
}

/// Keywords of at most this many words yield to a model sure of another
/// intent; longer ones ("what do you recommend") always decide.
const MODEL_OVERRULES_WORDS: usize = 2;

/// How sure the model must be of another intent to overrule a short
/// keyword.
const MODEL_OVERRULES_CONFIDENCE: f64 = 0.7;

/// The classification for an intent chosen elsewhere (an LLM answer, a
/// test's stub): `min_confidence` applies and entities are extracted.
pub fn decide(
    project: &CompiledProject,
    text: &str,
    intent: IntentId,
    confidence: f64,
) -> Classification {
    finish(project, text, intent, confidence, Source::Llm, None)
}

/// Applies `min_confidence` and extracts the entities of the chosen intent.
fn finish(
    project: &CompiledProject,
    text: &str,
    intent: IntentId,
    confidence: f64,
    source: Source,
    fallback_reason: Option<String>,
) -> Classification {
    let intent = project.classifier.sure_enough(intent, confidence);
    let mut entities = BTreeMap::new();
    for entity in &project.intent(intent).entities {
        if let Some(captures) = entity.pattern.captures(text) {
            let found = captures.get(1).or_else(|| captures.get(0));
            if let Some(found) = found {
                entities.insert(entity.name.clone(), found.as_str().to_owned());
            }
        }
    }
    Classification {
        intent,
        confidence,
        entities,
        source,
        fallback_reason,
    }
}

/// How to reach an OpenAI-compatible API.
#[derive(Clone)]
pub struct LlmConnection {
    pub api_key: String,
    /// `OPENAI_BASE_URL`, e.g. `http://127.0.0.1:8081/v1`; `None` for OpenAI.
    pub base_url: Option<String>,
    /// `OPENAI_MODEL`, overriding the project's model when set.
    pub model: Option<String>,
}

impl std::fmt::Debug for LlmConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmConnection")
            .field("api_key", &"<redacted>")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .finish()
    }
}

/// The LLM classifier: asks the model for one of the declared intents
/// through a structured-output schema, and falls back to the rules on any
/// failure (timeout, HTTP error, malformed or undeclared answer).
pub struct LlmClassifier {
    client: Client<OpenAIConfig>,
    model_override: Option<String>,
    /// Scrubbed from failure reasons before they are logged: an
    /// OpenAI-compatible server may quote the key in its error message.
    api_key: String,
}

impl LlmClassifier {
    /// `http` is the process's shared HTTP client.
    pub fn new(connection: LlmConnection, http: reqwest::Client) -> LlmClassifier {
        let api_key = connection.api_key.clone();
        let mut config = OpenAIConfig::new().with_api_key(connection.api_key);
        if let Some(base_url) = connection.base_url {
            config = config.with_api_base(base_url.trim_end_matches('/'));
        }
        // A plain service, without the retry layer async-openai installs by
        // default (three retries honouring Retry-After): the single retry is
        // done here, inside the classification deadline, so no Retry-After
        // can make a turn wait.
        let client = Client::with_config(config)
            .with_http_service(async_openai::middleware::ReqwestService::new(http));
        LlmClassifier {
            client,
            model_override: connection.model,
            api_key,
        }
    }

    async fn ask(&self, project: &CompiledProject, text: &str) -> Result<(IntentId, f64), String> {
        let model = self
            .model_override
            .clone()
            .unwrap_or_else(|| project.classifier.llm.model.clone());
        let request = CreateChatCompletionRequest {
            model,
            messages: vec![
                ChatCompletionRequestMessage::System(ChatCompletionRequestSystemMessage::from(
                    project.classifier.llm.prompt.as_str(),
                )),
                ChatCompletionRequestMessage::User(ChatCompletionRequestUserMessage::from(text)),
            ],
            temperature: Some(0.0),
            response_format: Some(ResponseFormat::JsonSchema {
                json_schema: ResponseFormatJsonSchema {
                    name: "intent_classification".to_owned(),
                    description: Some("The intent of the user's message".to_owned()),
                    schema: project.classifier.llm.answer_schema.clone(),
                    strict: Some(true),
                },
            }),
            ..Default::default()
        };
        let response = self
            .client
            .chat()
            .create(request)
            .await
            .map_err(|error| format!("request failed: {error}"))?;
        let content = response
            .choices
            .first()
            .and_then(|choice| choice.message.content.as_deref())
            .ok_or_else(|| "the answer has no content".to_owned())?;
        #[derive(Deserialize)]
        struct Answer {
            intent: String,
            confidence: f64,
        }
        let answer: Answer = serde_json::from_str(content)
            .map_err(|error| format!("the answer is not the expected JSON: {error}"))?;
        let intent = project
            .intent_by_name(&answer.intent)
            .ok_or_else(|| format!("the answer names an undeclared intent `{}`", answer.intent))?;
        if !(0.0..=1.0).contains(&answer.confidence) {
            return Err(format!(
                "the answer's confidence {} is not between 0 and 1",
                answer.confidence
            ));
        }
        Ok((intent, answer.confidence))
    }
}

/// At most this many tries of the LLM per classification.
const LLM_ATTEMPTS: u32 = 2;

impl Classifier for LlmClassifier {
    fn classify<'a>(
        &'a self,
        project: &'a CompiledProject,
        text: &'a str,
    ) -> BoxFuture<'a, Classification> {
        Box::pin(async move {
            let timeout = project.classifier.llm.timeout;
            let started = Instant::now();
            let mut reason = String::new();
            let mut outcome = "error";
            for attempt in 1..=LLM_ATTEMPTS {
                let remaining = timeout.saturating_sub(started.elapsed());
                if remaining.is_zero() {
                    outcome = "timeout";
                    break;
                }
                match tokio::time::timeout(remaining, self.ask(project, text)).await {
                    Ok(Ok((intent, confidence))) => {
                        record_llm_metrics("ok", started.elapsed());
                        return finish(project, text, intent, confidence, Source::Llm, None);
                    }
                    Ok(Err(error)) => reason = error,
                    Err(_) => {
                        reason =
                            format!("no answer within {}", humantime::format_duration(timeout));
                        outcome = "timeout";
                        break;
                    }
                }
                if attempt < LLM_ATTEMPTS {
                    tokio::time::sleep(Duration::from_millis(50).min(remaining)).await;
                }
            }
            record_llm_metrics(outcome, started.elapsed());
            if !self.api_key.is_empty() {
                reason = reason.replace(&self.api_key, crate::telemetry::redact::REDACTED);
            }
            tracing::warn!(
                event_type = "intent_fallback",
                reason = %reason,
                "LLM classification failed; using the rules"
            );
            let mut classification = classify_by_rules(project, text);
            classification.fallback_reason = Some(reason);
            classification
        })
    }
}

/// Counts an LLM classification by outcome (`ok`, `error`, `timeout`) and
/// times it.
fn record_llm_metrics(outcome: &'static str, elapsed: Duration) {
    use crate::telemetry::prometheus;
    metrics::counter!(prometheus::LLM_CLASSIFICATIONS_TOTAL, "outcome" => outcome).increment(1);
    metrics::histogram!(prometheus::LLM_CLASSIFICATION_DURATION_SECONDS)
        .record(elapsed.as_secs_f64());
}

/// Examples of one intent shown to the LLM, at most.
pub const LLM_EXAMPLES_PER_INTENT: usize = 5;

/// Characters of examples in the LLM's prompt, at most (about 1,500
/// tokens), however many intents the project has.
pub const LLM_EXAMPLE_BUDGET: usize = 6_000;

/// The system prompt and the structured-output schema for the LLM, built
/// once from the project's intents when the project is compiled. The prompt
/// shows a few examples of each intent (`llm_examples`).
pub fn llm_instructions(intents: &[crate::project::Intent]) -> (String, serde_json::Value) {
    use std::fmt::Write as _;
    let mut prompt = String::from(
        "You classify the message of a customer of a restaurant's ordering assistant into \
         exactly one of the intents below. Answer with the intent's name and your confidence \
         between 0 and 1.\n\nIntents:\n",
    );
    let shown = llm_examples(intents);
    for (intent, examples) in intents.iter().zip(&shown) {
        let _ = write!(prompt, "- {}", intent.name);
        if !intent.description.is_empty() {
            let _ = write!(prompt, ": {}", intent.description);
        }
        prompt.push('\n');
        for example in examples {
            let _ = writeln!(prompt, "    example: {example}");
        }
    }
    let names: Vec<&str> = intents.iter().map(|intent| intent.name.as_str()).collect();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "intent": {"type": "string", "enum": names},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1}
        },
        "required": ["intent", "confidence"],
        "additionalProperties": false
    });
    (prompt, schema)
}

/// The examples of each intent the LLM is shown: up to
/// `LLM_EXAMPLES_PER_INTENT` each, unlike one another (an example sharing
/// half its words with one already chosen waits for a later round), taken
/// one round over all intents at a time until `LLM_EXAMPLE_BUDGET`
/// characters, so every intent keeps some when there are many.
pub fn llm_examples(intents: &[crate::project::Intent]) -> Vec<Vec<&str>> {
    let ordered: Vec<Vec<&str>> = intents
        .iter()
        .map(|intent| varied_first(&intent.examples))
        .collect();
    let mut shown: Vec<Vec<&str>> = vec![Vec::new(); intents.len()];
    let mut budget = LLM_EXAMPLE_BUDGET;
    'rounds: for round in 0..LLM_EXAMPLES_PER_INTENT {
        for (examples, chosen) in ordered.iter().zip(&mut shown) {
            let Some(example) = examples.get(round) else {
                continue;
            };
            if example.len() > budget {
                break 'rounds;
            }
            budget -= example.len();
            chosen.push(example);
        }
    }
    shown
}

/// The examples in their order, but each one that shares half its words
/// or more with an earlier pick moved after the ones that do not.
fn varied_first(examples: &[String]) -> Vec<&str> {
    let words = |text: &str| -> std::collections::BTreeSet<String> {
        normalize(text)
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let mut picked: Vec<(&str, std::collections::BTreeSet<String>)> = Vec::new();
    let mut later = Vec::new();
    for example in examples {
        let own = words(example);
        let alike = picked.iter().any(|(_, other)| {
            let shared = own.intersection(other).count();
            let union = own.union(other).count();
            union > 0 && shared * 2 >= union
        });
        if alike {
            later.push(example.as_str());
        } else {
            picked.push((example, own));
        }
    }
    picked
        .into_iter()
        .map(|(example, _)| example)
        .chain(later)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::project::KeywordIndex;

    #[test]
    fn normalize_keeps_words_and_apostrophes() {
        assert_eq!(
            normalize("Track MY order, please!"),
            " track my order please "
        );
        assert_eq!(normalize("I’d like…"), " i'd like ");
        assert_eq!(normalize(""), " ");
    }

    fn index(keywords: &[&[&str]]) -> KeywordIndex {
        let intents: Vec<crate::project::Intent> = keywords
            .iter()
            .enumerate()
            .map(|(index, words)| {
                let mut intent = intent_with_examples(&format!("intent{index}"), &[]);
                intent.keywords = words.iter().map(|word| (*word).to_owned()).collect();
                intent
            })
            .collect();
        KeywordIndex::new(&intents).unwrap()
    }

    #[test]
    fn phrases_match_whole_words_only() {
        let text = normalize("Can you track this order?");
        let matches = |keyword: &str| index(&[&[keyword]]).best_match(&text).is_some();
        assert!(matches("track"));
        assert!(matches("this order"));
        assert!(!matches("hi"));
        assert!(!matches("rack"));
        assert!(!matches("track this ord"));
    }

    #[test]
    fn the_most_specific_keyword_wins_and_ties_go_to_the_first() {
        let keywords: &[&[&str]] = &[
            &["order", "my order"],
            &["track my order"],
            &["order"],
            &["menu"],
        ];
        let index = index(keywords);
        let best = |text: &str| index.best_match(&normalize(text));
        assert_eq!(best("track my order"), Some((IntentId(1), 3)));
        assert_eq!(best("where is my order"), Some((IntentId(0), 2)));
        // `order` is a keyword of intents 0 and 2: the first declared wins.
        assert_eq!(best("order now"), Some((IntentId(0), 1)));
        // Overlapping matches are all seen.
        assert_eq!(best("menu order"), Some((IntentId(0), 1)));
        assert_eq!(best("nothing here"), None);
    }

    fn intent_with_examples(name: &str, examples: &[&str]) -> crate::project::Intent {
        crate::project::Intent {
            name: name.to_owned(),
            description: String::new(),
            examples: examples.iter().map(|e| (*e).to_owned()).collect(),
            keywords: Vec::new(),
            entities: Vec::new(),
        }
    }

    #[test]
    fn the_llm_sees_a_few_varied_examples_of_each_intent() {
        let intents = [
            intent_with_examples(
                "menu",
                &[
                    "show me the menu",
                    "show me the menu please",
                    "what do you serve",
                    "can I see the menu",
                    "which desserts do you have",
                    "menu",
                    "what's on the menu today",
                    "do you have vegan dishes",
                ],
            ),
            intent_with_examples("track", &["where is my order"]),
        ];
        let shown = llm_examples(&intents);
        // "show me the menu please" shares most of its words with the first
        // pick, so it waits and the fifth place goes to another wording.
        assert_eq!(
            shown[0],
            [
                "show me the menu",
                "what do you serve",
                "can I see the menu",
                "which desserts do you have",
                "menu",
            ]
        );
        assert_eq!(shown[1], ["where is my order"]);
        let (prompt, _) = llm_instructions(&intents);
        assert!(
            prompt.contains("- track\n    example: where is my order\n"),
            "{prompt}"
        );
        assert!(!prompt.contains("show me the menu please"), "{prompt}");
    }

    #[test]
    fn the_examples_in_the_llm_prompt_stay_within_the_budget_for_every_intent() {
        let long = "a rather long example sentence of some sixty characters each";
        let intents: Vec<_> = (0..200)
            .map(|index| {
                intent_with_examples(&format!("intent{index}"), &[long, "short one", "x y"])
            })
            .collect();
        let shown = llm_examples(&intents);
        let characters: usize = shown.iter().flatten().map(|example| example.len()).sum();
        assert!(characters <= LLM_EXAMPLE_BUDGET, "{characters}");
        // The first round reaches every intent that fits before the
        // budget ends; none gets a second example before all got a first.
        let first_round = shown.iter().filter(|examples| !examples.is_empty()).count();
        assert_eq!(first_round, LLM_EXAMPLE_BUDGET / long.len());
        assert!(shown.iter().all(|examples| examples.len() <= 1));
    }
}
