//! SparseGrad (Chekalina et al., EMNLP 2024). This first piece is the basis phase: Gram sums of
//! MLP weight gradients per matrix type, their eigenvectors as the orthogonal bases `P`, `Q`,
//! the rotation `G̃ = Pᵀ G Q`, and exact top-k selection. The method itself (sparse training,
//! supports, sparse Adam, delta artifacts) builds on these.

pub mod basis;
