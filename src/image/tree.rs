//! The image's file tree, keyed by node id: every node with its parent and
//! name, and each directory's children by name.
//!
//! Ids are the inode numbers the FUSE edge hands out, so an operation on an
//! open file is one map lookup, and a lookup in a directory is one more; no
//! operation walks the tree. Paths are derived (walking up the parents) only
//! where paths are the interface: the state records, which are keyed by path,
//! the manifest, and callers that name files by path.
//!
//! Invariants:
//! - the root ([`ROOT`], id 1) is not stored: it is always a directory
//!   ([`root_node`]) and cannot be changed or removed;
//! - every stored node's parent is a directory in the tree, and the node is
//!   listed under its name in that directory's children, exactly once;
//! - a directory has a children map (possibly empty), a file has none;
//! - ids are never reused (the image hands them out from a counter).

use std::collections::{BTreeMap, HashMap};

use crate::manifest::Timestamp;

/// Id of the root directory.
pub const ROOT: u64 = 1;

/// What a tree entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory.
    Directory,
    /// A regular file.
    File,
}

/// The attributes of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node {
    /// Stable id (inode number), unchanged by rename; the root is 1.
    pub id: u64,
    /// Directory or file.
    pub kind: NodeKind,
    /// Permission bits.
    pub mode: u32,
    /// Modification time.
    pub mtime: Timestamp,
    /// Size in bytes (0 for directories).
    pub size: u64,
    /// Index of the base manifest file this file started as.
    pub(super) base: Option<u64>,
    /// Base chunks at or past this index are zeros (after truncation).
    pub(super) base_limit: u64,
}

/// The root directory's attributes.
pub(super) fn root_node() -> Node {
    Node {
        id: ROOT,
        kind: NodeKind::Directory,
        mode: 0o755,
        mtime: Timestamp::default(),
        size: 0,
        base: None,
        base_limit: 0,
    }
}

/// A stored node and where it hangs.
#[derive(Debug, Clone)]
struct Placed {
    node: Node,
    parent: u64,
    name: String,
}

/// The tree; see the module doc for its invariants.
#[derive(Debug)]
pub(super) struct Tree {
    nodes: HashMap<u64, Placed>,
    children: HashMap<u64, BTreeMap<String, u64>>,
}

/// The parent part of `path` ("" for a top-level entry).
pub(super) fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(parent, _)| parent)
}

/// `name` inside the directory at `parent` ("" is the root).
pub(super) fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}/{name}")
    }
}

impl Tree {
    /// A tree holding only the root.
    pub(super) fn new() -> Tree {
        Tree {
            nodes: HashMap::new(),
            children: HashMap::from([(ROOT, BTreeMap::new())]),
        }
    }

    /// The node with id `id` (the root included).
    pub(super) fn get(&self, id: u64) -> Option<Node> {
        if id == ROOT {
            return Some(root_node());
        }
        self.nodes.get(&id).map(|placed| placed.node)
    }

    /// The stored node with id `id`, to change it (never the root).
    pub(super) fn get_mut(&mut self, id: u64) -> Option<&mut Node> {
        self.nodes.get_mut(&id).map(|placed| &mut placed.node)
    }

    /// Stored node `id` with its path (never the root, which has no record).
    pub(super) fn entry(&self, id: u64) -> Option<(String, Node)> {
        let node = self.nodes.get(&id)?.node;
        Some((self.path_of(id)?, node))
    }

    /// The id of `name` in directory `parent`.
    pub(super) fn child(&self, parent: u64, name: &str) -> Option<u64> {
        self.children.get(&parent)?.get(name).copied()
    }

    /// The children of directory `id` by name; `None` if it is not a directory.
    pub(super) fn children(&self, id: u64) -> Option<&BTreeMap<String, u64>> {
        self.children.get(&id)
    }

    /// The id of the entry at `path` ("" is the root).
    pub(super) fn resolve(&self, path: &str) -> Option<u64> {
        if path.is_empty() {
            return Some(ROOT);
        }
        path.split('/')
            .try_fold(ROOT, |dir, name| self.child(dir, name))
    }

    /// The path of node `id` ("" for the root): one step per directory level.
    pub(super) fn path_of(&self, id: u64) -> Option<String> {
        let mut names = Vec::new();
        let mut current = id;
        while current != ROOT {
            let placed = self.nodes.get(&current)?;
            names.push(placed.name.as_str());
            current = placed.parent;
        }
        names.reverse();
        Some(names.join("/"))
    }

    /// Whether `ancestor` is `id` or one of its parents.
    pub(super) fn is_within(&self, id: u64, ancestor: u64) -> bool {
        let mut current = id;
        loop {
            if current == ancestor {
                return true;
            }
            match self.nodes.get(&current) {
                Some(placed) => current = placed.parent,
                None => return false,
            }
        }
    }

    /// Adds `node` as `name` in directory `parent`; the caller has checked
    /// that `parent` is a directory and `name` is free.
    pub(super) fn insert(&mut self, parent: u64, name: &str, node: Node) {
        let siblings = self
            .children
            .get_mut(&parent)
            .expect("insert into a directory of the tree");
        let previous = siblings.insert(name.to_owned(), node.id);
        debug_assert!(previous.is_none(), "insert over an existing entry");
        if node.kind == NodeKind::Directory {
            self.children.entry(node.id).or_default();
        }
        self.nodes.insert(
            node.id,
            Placed {
                node,
                parent,
                name: name.to_owned(),
            },
        );
    }

    /// Adds `node` at `path`, whose parent must be in the tree already
    /// (manifests and state records list parents first); false if it is not.
    pub(super) fn insert_at(&mut self, path: &str, node: Node) -> bool {
        let name = path.rsplit_once('/').map_or(path, |(_, name)| name);
        match self.resolve(parent_of(path)) {
            Some(parent) if self.children.contains_key(&parent) => {
                if self.child(parent, name).is_some() {
                    return false;
                }
                self.insert(parent, name, node);
                true
            }
            _ => false,
        }
    }

    /// Removes node `id` (a file, or a directory the caller found empty).
    pub(super) fn remove(&mut self, id: u64) -> Option<Node> {
        let placed = self.nodes.remove(&id)?;
        if let Some(siblings) = self.children.get_mut(&placed.parent) {
            siblings.remove(&placed.name);
        }
        self.children.remove(&id);
        Some(placed.node)
    }

    /// Moves node `id` to `name` in directory `parent` (free; the caller has
    /// checked that `parent` is a directory outside `id`).
    pub(super) fn move_to(&mut self, id: u64, parent: u64, name: &str) {
        let placed = self.nodes.get_mut(&id).expect("moving a node of the tree");
        let (old_parent, old_name) = (placed.parent, std::mem::take(&mut placed.name));
        placed.parent = parent;
        placed.name = name.to_owned();
        if let Some(siblings) = self.children.get_mut(&old_parent) {
            siblings.remove(&old_name);
        }
        self.children
            .get_mut(&parent)
            .expect("move into a directory of the tree")
            .insert(name.to_owned(), id);
    }

    /// Node `id` and everything below it, with their paths, parents first.
    pub(super) fn subtree(&self, id: u64) -> Vec<(String, Node)> {
        let Some(path) = self.path_of(id) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut stack = vec![(path, id)];
        while let Some((path, id)) = stack.pop() {
            if let Some(node) = self.get(id)
                && id != ROOT
            {
                out.push((path.clone(), node));
            }
            if let Some(children) = self.children.get(&id) {
                stack.extend(
                    children
                        .iter()
                        .rev()
                        .map(|(name, child)| (join(&path, name), *child)),
                );
            }
        }
        out
    }

    /// Every stored node with its path, in byte order of the paths (the
    /// manifest's order).
    pub(super) fn all(&self) -> Vec<(String, Node)> {
        let mut all = self.subtree(ROOT);
        all.sort_unstable_by(|(a, _), (b, _)| a.cmp(b));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, kind: NodeKind) -> Node {
        Node {
            id,
            kind,
            ..root_node()
        }
    }

    #[test]
    fn paths_ids_and_moves_agree() {
        let mut tree = Tree::new();
        assert!(tree.insert_at("a", node(2, NodeKind::Directory)));
        assert!(tree.insert_at("a/f", node(3, NodeKind::File)));
        assert!(tree.insert_at("a.b", node(4, NodeKind::File)));
        assert!(!tree.insert_at("nodir/x", node(5, NodeKind::File)));
        assert!(!tree.insert_at("a/f/x", node(5, NodeKind::File)));
        assert_eq!(tree.resolve("a/f"), Some(3));
        assert_eq!(tree.path_of(3).as_deref(), Some("a/f"));
        let paths: Vec<String> = tree.all().into_iter().map(|(p, _)| p).collect();
        assert_eq!(paths, ["a", "a.b", "a/f"], "byte order of paths");
        tree.move_to(2, ROOT, "z");
        assert_eq!(tree.path_of(3).as_deref(), Some("z/f"));
        assert_eq!(tree.resolve("a/f"), None);
        assert!(tree.is_within(3, 2) && !tree.is_within(2, 3));
        assert_eq!(tree.remove(3).map(|n| n.id), Some(3));
        assert!(tree.children(2).is_some_and(BTreeMap::is_empty));
    }
}
