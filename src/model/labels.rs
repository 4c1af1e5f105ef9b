//! Class names, one per line in class-index order.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Labels(Vec<String>);

/// A label file that cannot be read or does not have one name per class.
#[derive(Debug, Clone, thiserror::Error)]
#[error("labels {}: {message}", path.display())]
pub struct LabelsError {
    pub path: PathBuf,
    pub message: String,
}

impl Labels {
    pub fn load(path: &Path, expected: usize) -> Result<Self, LabelsError> {
        let error = |message: String| LabelsError { path: path.to_path_buf(), message };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let names: Vec<String> = text.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
        if names.len() != expected {
            return Err(error(format!("{} names, the model has {expected} classes", names.len())));
        }
        Ok(Labels(names))
    }

    /// Labels from names in class-index order (tests and generated models).
    pub fn from_names(names: Vec<String>) -> Self {
        Labels(names)
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
