//! Visual-token compression: pooling on the (t, h, w) grid, attention scores, selection, pruning and merging.
