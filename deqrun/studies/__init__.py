"""Studies of trained or synthetic DEQs, run beside training rather than inside it.

gradcheck: a model's parameter gradient under any gradient method against the exact one;
precision: the gradient-precision study (python -m deqrun.studies.precision).
"""
