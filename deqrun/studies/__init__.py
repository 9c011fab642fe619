"""Studies of trained or synthetic DEQs, run beside training rather than inside it.

gradcheck: a model's parameter gradient under any gradient method against the exact one;
precision: the gradient-precision study (python -m deqrun.studies.precision);
inversion: SHINE's inversion quality with and without OPA (python -m deqrun.studies.inversion);
bilevel: SHINE's bi-level hyperparameter study (python -m deqrun.studies.bilevel);
root_problems: classic small root problems for the solver tests and scripts/solver_suite.py.
"""
