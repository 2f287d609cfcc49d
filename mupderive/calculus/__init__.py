"""The scaling calculus: width exponents of every quantity in a rule, from the spectral condition."""
