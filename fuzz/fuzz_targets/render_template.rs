//! Rendering templates against arbitrary JSON. The input is a template
//! source, a newline, then a JSON document. The source is compiled as the
//! project compiles templates (strict undefined values, fuel, recursion
//! limit) and rendered; so are the shipped project's reply templates, with
//! the document as every step result, `input` and `session`. A template may
//! fail with an error, never panic or run without end.

#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use mcp_orchestrator::template::{TemplatesBuilder, json_document};
use minijinja::Value;

/// Reply templates of the shipped project (flows/*.yaml).
const SHIPPED: &[&str] = &[
    "Here's what we're serving today:\n{%- for category in menu.categories %}\n\n{{ category.name }}\n{%- for dish in category.items %}\n- {{ dish.name }}\n{%- if dish.price is number %} — {{ \"%.2f\" | format(dish.price) }} {{ dish.currency or \"EUR\" }}{% endif %}\n{%- endfor %}\n{%- endfor %}\n\nJust tell me what you'd like to order.",
    "Thank you! Your order {{ placed.order_id }} is {{ placed.status | replace(\"_\", \" \") }}.\n{%- if placed.eta_minutes is number %} It should be ready in about {{ placed.eta_minutes }} minutes.{% endif %}\n{%- if placed.total_amount is number %} Total: {{ \"%.2f\" | format(placed.total_amount) }} {{ placed.currency or \"EUR\" }}.{% endif %}",
    "Here's what I'd suggest:\n{%- for dish in suggestions.recommendations %}\n{{ loop.index }}. {{ dish.name }}\n{%- if dish.price is number %} ({{ \"%.2f\" | format(dish.price) }} {{ dish.currency or \"EUR\" }}){% endif %}\n{%- if dish.reason %} — {{ dish.reason }}{% endif %}\n{%- endfor %}",
    "{%- if profile.preferences.dietary %}\n- Diet: {{ profile.preferences.dietary | join(\", \") }}\n{%- endif %}\n{%- if profile.order_history_summary.avg_spend is number %}\n- Average spend: {{ \"%.2f\" | format(profile.order_history_summary.avg_spend) }} EUR\n{%- endif %}",
    "{{ input.order_special_instructions or input.special_instructions or none }} {{ input.tracking_order_id or intent.entities.order_id or session.last_order_id }}",
    "{{ input.preferences if input.preferences is mapping else {'note': text} }}",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (source, document) = text.split_once('\n').unwrap_or((text, "null"));
    let Ok(document) = serde_json::from_str::<serde_json::Value>(document) else {
        return;
    };
    let mut builder = TemplatesBuilder::default();
    let mut ids = Vec::new();
    for template in SHIPPED {
        ids.push(builder.add_template(template).expect("the shipped templates compile").0);
    }
    // An arbitrary source may not compile: that is an answer too.
    if let Ok((id, _)) = builder.add_template(source) {
        ids.push(id);
    }
    let Ok(templates) = builder.finish() else {
        return;
    };
    let value = json_document(document);
    let mut context = BTreeMap::new();
    for name in ["menu", "placed", "suggestions", "profile", "tracked", "input", "session", "intent"] {
        context.insert(name.to_owned(), value.clone());
    }
    context.insert("text".to_owned(), Value::from("what do you serve"));
    let context = Value::from(context);
    for id in ids {
        let _ = templates.render(id, &context);
    }
});
