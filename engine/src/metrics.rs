//! Evaluation metrics: accuracy, macro-F1 and Matthews correlation for classification,
//! Pearson and Spearman for regression, loss and perplexity for causal LM.

pub fn accuracy(pred: &[u32], gold: &[u32]) -> f64 {
    if gold.is_empty() {
        return 0.0;
    }
    pred.iter().zip(gold).filter(|(p, g)| p == g).count() as f64 / gold.len() as f64
}

/// Unweighted mean of per-class F1 over the classes that occur in gold or predictions.
pub fn macro_f1(pred: &[u32], gold: &[u32], num_classes: usize) -> f64 {
    let mut f1s = Vec::new();
    for c in 0..num_classes as u32 {
        let tp = pred
            .iter()
            .zip(gold)
            .filter(|(p, g)| **p == c && **g == c)
            .count() as f64;
        let fp = pred
            .iter()
            .zip(gold)
            .filter(|(p, g)| **p == c && **g != c)
            .count() as f64;
        let fnn = pred
            .iter()
            .zip(gold)
            .filter(|(p, g)| **p != c && **g == c)
            .count() as f64;
        if tp + fp + fnn == 0.0 {
            continue;
        }
        f1s.push(2.0 * tp / (2.0 * tp + fp + fnn));
    }
    if f1s.is_empty() {
        0.0
    } else {
        f1s.iter().sum::<f64>() / f1s.len() as f64
    }
}

/// Multi-class Matthews correlation (Gorodkin's R_K), as scikit-learn computes it.
pub fn matthews(pred: &[u32], gold: &[u32], num_classes: usize) -> f64 {
    let k = num_classes;
    let mut cm = vec![vec![0f64; k]; k];
    for (p, g) in pred.iter().zip(gold) {
        cm[*g as usize][*p as usize] += 1.0;
    }
    let s: f64 = pred.len() as f64;
    let c: f64 = (0..k).map(|i| cm[i][i]).sum();
    let t: Vec<f64> = (0..k).map(|i| cm[i].iter().sum()).collect(); // true counts
    let p: Vec<f64> = (0..k).map(|j| (0..k).map(|i| cm[i][j]).sum()).collect(); // predicted
    let cov_ytyp = c * s - t.iter().zip(&p).map(|(a, b)| a * b).sum::<f64>();
    let cov_ypyp = s * s - p.iter().map(|x| x * x).sum::<f64>();
    let cov_ytyt = s * s - t.iter().map(|x| x * x).sum::<f64>();
    if cov_ypyp * cov_ytyt == 0.0 {
        return 0.0;
    }
    cov_ytyp / (cov_ytyt * cov_ypyp).sqrt()
}

pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    if x.len() < 2 {
        return 0.0;
    }
    let mx = x.iter().sum::<f64>() / n;
    let my = y.iter().sum::<f64>() / n;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    if sxx == 0.0 || syy == 0.0 {
        return 0.0;
    }
    sxy / (sxx * syy).sqrt()
}

/// Ranks with ties sharing their average rank.
fn ranks(x: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && x[idx[j + 1]] == x[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            r[idx[k]] = avg;
        }
        i = j + 1;
    }
    r
}

pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_metrics_match_known_values() {
        // sklearn: accuracy 0.6, f1_macro 0.5833.., matthews_corrcoef 0.1667
        let gold = [0, 0, 1, 1, 1];
        let pred = [0, 1, 1, 1, 0];
        assert!((accuracy(&pred, &gold) - 0.6).abs() < 1e-12);
        assert!((macro_f1(&pred, &gold, 2) - 0.583_333_333_333_333_4).abs() < 1e-9);
        assert!((matthews(&pred, &gold, 2) - 0.166_666_666_666_666_66).abs() < 1e-9);
        assert_eq!(matthews(&[1, 1, 1], &[0, 1, 1], 2), 0.0);
    }

    #[test]
    fn correlations_match_known_values() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let y = [2.0, 1.0, 4.0, 3.0, 7.0];
        // Σdxdy = 12, Σdx² = 10, Σdy² = 21.2 → r = 12/√212; rank differences (−1, 1, −1, 1, 0) → ρ = 1 − 6·4/120
        assert!((pearson(&x, &y) - 12.0 / 212f64.sqrt()).abs() < 1e-12);
        assert!((spearman(&x, &y) - 0.8).abs() < 1e-12);
        assert!(
            (spearman(&[1.0, 1.0, 2.0], &[1.0, 2.0, 3.0]) - 0.866_025_403_784_438_6).abs() < 1e-12
        );
    }
}
