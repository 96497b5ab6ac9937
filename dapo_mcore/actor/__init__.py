"""Stage 5, actor: the policy trained with the DAPO loss on the advantage dataset."""
