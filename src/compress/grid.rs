//! The (t, h, w) grids visual tokens are laid out on.

use crate::error::Result;
use crate::value_err;

/// One image's (or video's) token grid: `t` frames of `h` x `w` tokens, row-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Grid {
    pub t: usize,
    pub h: usize,
    pub w: usize,
}

impl Grid {
    pub fn new(t: usize, h: usize, w: usize) -> Self {
        Grid { t, h, w }
    }

    /// `t * h * w`
    pub fn tokens(&self) -> usize {
        self.t * self.h * self.w
    }
}

/// Check `grid_thw` rows (every dimension >= 1, products summing to `tokens`) and turn them into
/// [`Grid`]s; `tokens_of` names what holds the tokens in errors (e.g. `"x has 1296 rows"`).
pub fn check_grids(rows: &[[i64; 3]], tokens: usize, tokens_of: &str) -> Result<Vec<Grid>> {
    let mut grids = Vec::with_capacity(rows.len());
    let mut total: usize = 0;
    for (i, &[t, h, w]) in rows.iter().enumerate() {
        if t < 1 || h < 1 || w < 1 {
            return Err(value_err!(
                "grid_thw[{i}] = ({t}, {h}, {w}): every grid dimension must be >= 1"
            ));
        }
        let grid = Grid::new(t as usize, h as usize, w as usize);
        let count = grid
            .t
            .checked_mul(grid.h)
            .and_then(|th| th.checked_mul(grid.w))
            .and_then(|n| total.checked_add(n))
            .ok_or_else(|| value_err!("grid_thw[{i}] = ({t}, {h}, {w}): too many tokens"))?;
        total = count;
        grids.push(grid);
    }
    if total != tokens {
        return Err(value_err!(
            "grid_thw: the grids hold {total} tokens (sum of t*h*w over {} grids), but {tokens_of}",
            rows.len()
        ));
    }
    Ok(grids)
}

/// [`check_grids`] for grids that are already [`Grid`]s (Rust callers).
pub(crate) fn check_grid_list(grids: &[Grid], tokens: usize, tokens_of: &str) -> Result<()> {
    let rows: Vec<[i64; 3]> = grids
        .iter()
        .map(|g| [g.t as i64, g.h as i64, g.w as i64])
        .collect();
    check_grids(&rows, tokens, tokens_of).map(|_| ())
}
