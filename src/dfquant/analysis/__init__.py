"""The paper's analyses: gradient-norm traces, generalization gap, t-SNE of features."""
