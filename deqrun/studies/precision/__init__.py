"""The gradient-precision study (Geng et al. 2021, Figs. 1 and 3): how close each gradient method
comes to the exact implicit gradient.

Three parts, each written into --out as CSV and PNG, with the key numbers in summary.md:
  synthetic   f(z) = tanh(W z + U x) with ||W||_2 set; dense exact gradient; every method through
              deqrun.core.DEQ (always run);
  checkpoint  the trained model of a run folder (--run; any task and model family): every method
              against a tight implicit gradient on test batches, with that gradient's backward
              residual and the spectral radius of J (mdeq.csv, mdeq_vs_k.png);
  dynamic     the grad_cosine values logged during training (trainer.precision_every, --run).

Usage: python -m deqrun.studies.precision --out DIR [--run RUN_DIR] [--widths ...]
       [--spectral-norms ...] [--seeds N] [--quick]

Code: one module per part (synthetic, checkpoint, dynamic), the method grid (methods), medians
(stats), figures (plots), summary.md and CSV (report), the parts in order (study), argparse (cli).
"""
