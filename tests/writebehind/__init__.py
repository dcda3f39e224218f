"""Write-behind: the pure rules on their own, and the whole queue on a real Redis."""
