"""Per-instance patches that put back exactly what was there, so nothing of ours outlives a job."""


class InstancePatch:
    """``owner.name = value`` on the instance; ``remove()`` puts back what the instance had before."""

    def __init__(self, owner, name: str, value):
        self.owner, self.name, self.value = owner, name, value
        self.had_own, self.previous = name in vars(owner), vars(owner).get(name)
        setattr(owner, name, value)

    def remove(self) -> None:
        if vars(self.owner).get(self.name) is not self.value:
            return  # patched again on top of us: leave the newer patch alone
        if self.had_own:
            setattr(self.owner, self.name, self.previous)
        else:
            delattr(self.owner, self.name)
