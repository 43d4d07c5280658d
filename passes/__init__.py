"""Score and rewrite passes (installed as vitgraph.passes)."""
