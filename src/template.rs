//! The one template syntax of HydraFlow: `{{name}}` (spaces inside the
//! braces allowed), replaced in one pass, so a value that itself holds
//! braces (a prompt, an issue body) is never expanded again. A name the
//! lookup does not know is left as written. Used by the prompt templates
//! and by the agents' command lines (`agent.command`).

/// `template` with every `{{name}}` that `lookup` knows replaced.
pub fn fill(template: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let replaced = after
            .find("}}")
            .and_then(|close| lookup(after[..close].trim()).map(|v| (v, close)));
        match replaced {
            Some((value, close)) => {
                out.push_str(&value);
                rest = &after[close + 2..];
            }
            None => {
                out.push('{');
                rest = &rest[open + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The names written `{name}` (one pair of braces, the syntax HydraFlow's
/// command lines used before) in `text` among `known`: for an error that
/// says to write `{{name}}`.
pub fn single_brace_names<'a>(text: &str, known: &[&'a str]) -> Vec<&'a str> {
    known
        .iter()
        .filter(|name| {
            let single = format!("{{{name}}}");
            let double = format!("{{{{{name}}}}}");
            text.replace(&double, "").contains(&single)
        })
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(template: &str, expected: &str) {
        let lookup = |name: &str| match name {
            "a" => Some("1".to_owned()),
            "prompt" => Some("{{a}} {b}".to_owned()),
            _ => None,
        };
        assert_eq!(fill(template, lookup), expected, "{template:?}");
    }

    #[test]
    fn one_pass_of_known_names() {
        check("{{a}}", "1");
        check("x{{ a }}y{{a}}", "x1y1");
        check("{{prompt}}", "{{a}} {b}");
        check("{{b}}", "{{b}}");
        check("{a}", "{a}");
        check("{\"json\": {{a}}}", "{\"json\": 1}");
        check("{{{a}}}", "{1}");
        check("unclosed {{a", "unclosed {{a");
    }

    #[test]
    fn old_placeholders_are_found() {
        let known = ["stage", "issue", "prompt"];
        assert_eq!(single_brace_names("--stage={stage}", &known), ["stage"]);
        assert!(single_brace_names("{{stage}} {{prompt}}", &known).is_empty());
        assert_eq!(single_brace_names("{{issue}} {prompt}", &known), ["prompt"]);
    }
}
