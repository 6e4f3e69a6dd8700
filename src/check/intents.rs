//! Intents and the classifier: entity patterns, keywords, the fallback
//! intent and the LLM settings.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::diagnostic::{Code, Diagnostic, Location};
use crate::load;
use crate::project::{self, IntentId};
use crate::spec::{self, Spanned};

use super::{Checker, Defined};

impl Checker<'_> {
    pub(super) fn compile_intent(&mut self, intent: &Defined<'_, spec::Intent>) -> project::Intent {
        let spec = intent.spec;
        let mut entities = Vec::new();
        for (name, entity) in &spec.entities {
            match regex::Regex::new(&entity.pattern.value) {
                Ok(pattern) => entities.push(project::Entity {
                    name: name.value.clone(),
                    pattern,
                }),
                Err(error) => {
                    let location =
                        self.location(intent.file, &entity.pattern, entity.pattern.value.len());
                    self.push(
                        Diagnostic::error(
                            Code::InvalidRegex,
                            location,
                            format!(
                                "invalid regular expression for entity `{}`: {}",
                                name.value,
                                regex_error_summary(&error)
                            ),
                        )
                        .with_hint("patterns use Rust `regex` syntax, e.g. '\\bORD-\\d+\\b'; quote them with single quotes in YAML"),
                    );
                }
            }
        }
        for keyword in &spec.keywords {
            if keyword.value.trim().is_empty() {
                let location = self.location(intent.file, keyword, 1);
                self.error(Code::InvalidValue, location, "a keyword cannot be empty");
            }
        }
        project::Intent {
            name: intent.name.value.clone(),
            description: spec
                .description
                .as_ref()
                .map(|d| d.value.trim().to_owned())
                .unwrap_or_default(),
            examples: spec.examples.iter().map(|e| e.value.clone()).collect(),
            keywords: spec
                .keywords
                .iter()
                .map(|k| {
                    k.value
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                        .to_lowercase()
                })
                .filter(|k| !k.is_empty())
                .collect(),
            entities,
        }
    }

    pub(super) fn compile_classifier(
        &mut self,
        files: &[load::LoadedFile],
        classifier: Option<(&Path, &Spanned<spec::Classifier>)>,
        intent_ids: &HashMap<&str, IntentId>,
        intents: &[project::Intent],
    ) -> Option<project::Classifier> {
        let Some((file, classifier)) = classifier else {
            if !self.complete {
                return None;
            }
            let file = files
                .iter()
                .find(|file| !file.spec.intents.is_empty())
                .or(files.first())
                .map_or_else(|| PathBuf::from(load::FLOWS_DIR), |file| file.path.clone());
            self.push(
                Diagnostic::error(
                    Code::MissingFallback,
                    Location::file(file),
                    "the project has no `classifier` section naming the fallback intent",
                )
                .with_hint("add `classifier: { fallback: <intent> }` to one flow file"),
            );
            return None;
        };
        let spec = &classifier.value;
        let fallback = self.resolve(
            file,
            &spec.fallback,
            intent_ids,
            "intent",
            Code::UnknownIntent,
        );
        let min_confidence = match &spec.min_confidence {
            Some(value) if !(0.0..=1.0).contains(&value.value) => {
                let location = self.location(file, value, 1);
                self.error(
                    Code::InvalidValue,
                    location,
                    format!(
                        "`min_confidence` is {}; it must be between 0 and 1",
                        value.value
                    ),
                );
                project::DEFAULT_MIN_CONFIDENCE
            }
            Some(value) => value.value,
            None => project::DEFAULT_MIN_CONFIDENCE,
        };
        let (model, timeout) = match &spec.llm {
            Some(llm) => (
                llm.value
                    .model
                    .as_ref()
                    .map(|model| model.value.trim().to_owned())
                    .filter(|model| !model.is_empty()),
                llm.value
                    .timeout
                    .as_ref()
                    .and_then(|timeout| self.duration(file, timeout)),
            ),
            None => (None, None),
        };
        let (prompt, answer_schema) = crate::intent::llm_instructions(intents);
        let keywords = match project::KeywordIndex::new(intents) {
            Ok(keywords) => Some(keywords),
            Err(message) => {
                self.error(
                    Code::InvalidValue,
                    Location::file(file.to_path_buf()),
                    message,
                );
                None
            }
        };
        Some(project::Classifier {
            llm: project::LlmSettings {
                model: model.unwrap_or_else(|| project::DEFAULT_LLM_MODEL.to_owned()),
                timeout: timeout.unwrap_or(project::DEFAULT_LLM_TIMEOUT),
                prompt,
                answer_schema,
            },
            min_confidence,
            fallback: fallback?,
            keywords: keywords?,
            model: crate::intent::model::IntentModel::for_intents(intents),
        })
    }
}

/// An intent with fewer examples than this gets a `few-examples` warning
/// (once any intent of the project has examples).
pub const MIN_EXAMPLES: usize = 5;

impl Checker<'_> {
    /// Authoring help for the examples the classifiers learn from: an
    /// intent with few of them, the same example under two intents, and an
    /// example the offline classifier sends to another intent.
    pub(super) fn check_examples(
        &mut self,
        intents: &[Defined<'_, spec::Intent>],
        classifier: &project::Classifier,
    ) {
        if !self.complete || intents.iter().all(|intent| intent.spec.examples.is_empty()) {
            return;
        }
        for intent in intents {
            let count = intent.spec.examples.len();
            if count < MIN_EXAMPLES {
                let location = self.location(intent.file, intent.name, intent.name.value.len());
                self.push(
                    Diagnostic::warning(
                        Code::FewExamples,
                        location,
                        format!(
                            "intent `{}` has {count} example{}; the classifiers learn an intent from at least {MIN_EXAMPLES}",
                            intent.name.value,
                            if count == 1 { "" } else { "s" },
                        ),
                    )
                    .with_hint("add examples worded as customers would: short and long, polite and terse, with the typos people make"),
                );
            }
        }
        // The same words (case, accents and punctuation aside) twice.
        let mut seen: HashMap<String, (usize, &Path, &spec::Text)> = HashMap::new();
        let mut duplicated = std::collections::HashSet::new();
        for (index, intent) in intents.iter().enumerate() {
            for example in &intent.spec.examples {
                let key = crate::intent::normalize(&example.value);
                if key.trim().is_empty() {
                    continue;
                }
                match seen.get(&key) {
                    None => {
                        seen.insert(key, (index, intent.file, example));
                    }
                    Some((first_index, first_file, first)) => {
                        let first_name = &intents[*first_index].name.value;
                        let related = self.location(first_file, first, first.value.chars().count());
                        let location =
                            self.location(intent.file, example, example.value.chars().count());
                        let (message, hint) = if *first_index == index {
                            (
                                format!(
                                    "example \"{}\" is listed twice under intent `{first_name}`",
                                    example.value
                                ),
                                "remove one of them".to_owned(),
                            )
                        } else {
                            (
                                format!(
                                    "example \"{}\" of intent `{}` is also an example of intent `{first_name}`",
                                    example.value, intent.name.value
                                ),
                                "keep it under the one intent it means".to_owned(),
                            )
                        };
                        self.push(
                            Diagnostic::warning(Code::DuplicateExample, location, message)
                                .with_hint(hint)
                                .with_related(related, "first listed here"),
                        );
                        duplicated.insert(key);
                    }
                }
            }
        }
        for (index, intent) in intents.iter().enumerate() {
            let own = IntentId(index as u32);
            for example in &intent.spec.examples {
                if duplicated.contains(&crate::intent::normalize(&example.value)) {
                    continue;
                }
                let (chosen, confidence) = classifier.offline_intent(&example.value);
                if chosen == own {
                    continue;
                }
                let Some(competing) = intents.get(chosen.0 as usize) else {
                    continue;
                };
                let location = self.location(intent.file, example, example.value.chars().count());
                let related =
                    self.location(competing.file, competing.name, competing.name.value.len());
                let why = if chosen == classifier.fallback && confidence < classifier.min_confidence
                {
                    format!(
                        "the fallback intent `{}` (confidence {confidence:.2}, below `min_confidence` {})",
                        competing.name.value, classifier.min_confidence
                    )
                } else {
                    format!(
                        "intent `{}` (confidence {confidence:.2})",
                        competing.name.value
                    )
                };
                self.push(
                    Diagnostic::warning(
                        Code::ConfusableExample,
                        location,
                        format!(
                            "example \"{}\" of intent `{}` is classified as {why}",
                            example.value, intent.name.value
                        ),
                    )
                    .with_hint(format!(
                        "add examples that tell `{}` from `{}` apart, or reword this one; a keyword of three words or more always decides",
                        intent.name.value, competing.name.value
                    ))
                    .with_related(related, "the competing intent"),
                );
            }
        }
    }
}

/// The last line of a regex error ("error: unclosed group"), without its prefix.
fn regex_error_summary(error: &regex::Error) -> String {
    let text = error.to_string();
    let last = text
        .lines()
        .map(str::trim)
        .rfind(|line| !line.is_empty())
        .unwrap_or(&text);
    last.strip_prefix("error: ").unwrap_or(last).to_owned()
}
