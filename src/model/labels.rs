//! Class names, one per line in class-index order.

use std::path::Path;

#[derive(Debug, Clone)]
pub struct Labels(Vec<String>);

impl Labels {
    pub fn load(path: &Path, expected: usize) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("labels {}: {e}", path.display()))?;
        let names: Vec<String> = text.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
        if names.len() != expected {
            return Err(format!("labels {}: {} names, the model has {expected} classes", path.display(), names.len()));
        }
        Ok(Labels(names))
    }

    pub fn name(&self, class_id: usize) -> &str {
        self.0.get(class_id).map(String::as_str).unwrap_or("unknown")
    }

    /// Resolves a class by id ("388") or by name, case-insensitively ("giant panda").
    pub fn find(&self, query: &str) -> Option<usize> {
        let query = query.trim();
        if let Ok(id) = query.parse::<usize>() {
            return (id < self.0.len()).then_some(id);
        }
        self.0.iter().position(|name| name.eq_ignore_ascii_case(query))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_by_id_and_by_name() {
        let labels = Labels(vec!["tench".into(), "giant panda".into()]);
        assert_eq!(labels.find("1"), Some(1));
        assert_eq!(labels.find("Giant Panda"), Some(1));
        assert_eq!(labels.find("2"), None);
        assert_eq!(labels.find("vulture"), None);
        assert_eq!(labels.name(7), "unknown");
    }
}
