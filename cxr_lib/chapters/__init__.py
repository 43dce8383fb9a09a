"""What the chapters share and decide: data set-up, figures, and the sentences that turn
run files into verdicts (unit-tested on hand-made inputs)."""
