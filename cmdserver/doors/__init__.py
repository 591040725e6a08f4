"""Front doors: each translates its transport to the command core and back."""
