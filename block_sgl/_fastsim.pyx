# Placeholder until the simulator lands (issue 4).
def compiled():
    return True
