"""The one preflight (`check`): every user error `train` could raise before its first step, found torch-free."""
