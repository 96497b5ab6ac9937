"""Stage 4, advantage: Q_i of each candidate action, A_i = Q_i - mean Q, the gap filter, and the reference
log-probs the actor trains against."""
