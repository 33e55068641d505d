using System.Buffers.Binary;
using System.Text;

namespace ElasticMoE.Native;

/// <summary>
/// Marks selected symbol-version requirements of an ELF64 shared object as weak (VER_FLG_WEAK).
/// </summary>
/// <remarks>
/// Why: TorchSharp 0.107's libLibTorchSharp.so lists GLIBCXX_3.4.32 in its .gnu.version_r only for
/// <c>std::ios_base_library_init</c>, which no relocation uses. Debian 12's libstdc++ stops at 3.4.30,
/// so the dynamic loader refuses the whole library. A weak version need is merely reported if missing,
/// which lets the library load while every symbol it does use still binds to a version that exists.
/// The patch is idempotent and touches two bytes per entry.
/// </remarks>
public static class ElfVersionPatcher
{
    private const uint ShtGnuVerneed = 0x6ffffffe;
    private const ushort VerFlgWeak = 0x2;

    /// <summary>A version need found in a file: its name, the library it is needed from, and whether it is weak.</summary>
    public sealed record VersionNeed(string Library, string Version, bool Weak, int FlagsOffset);

    /// <summary>Lists the version needs of an ELF64 little-endian file.</summary>
    public static IReadOnlyList<VersionNeed> ReadVersionNeeds(byte[] elf)
    {
        if (elf.Length < 64 || elf[0] != 0x7f || elf[1] != (byte)'E' || elf[2] != (byte)'L' || elf[3] != (byte)'F')
            throw new InvalidDataException("not an ELF file");
        if (elf[4] != 2 || elf[5] != 1)
            throw new InvalidDataException("only ELF64 little-endian is supported");

        var span = elf.AsSpan();
        ulong shoff = BinaryPrimitives.ReadUInt64LittleEndian(span[0x28..]);
        int shentsize = BinaryPrimitives.ReadUInt16LittleEndian(span[0x3A..]);
        int shnum = BinaryPrimitives.ReadUInt16LittleEndian(span[0x3C..]);
        var result = new List<VersionNeed>();

        for (int i = 0; i < shnum; i++)
        {
            var sh = span[(int)(shoff + (ulong)(i * shentsize))..];
            uint type = BinaryPrimitives.ReadUInt32LittleEndian(sh[4..]);
            if (type != ShtGnuVerneed) continue;

            ulong offset = BinaryPrimitives.ReadUInt64LittleEndian(sh[0x18..]);
            uint link = BinaryPrimitives.ReadUInt32LittleEndian(sh[0x28..]);
            uint count = BinaryPrimitives.ReadUInt32LittleEndian(sh[0x2C..]); // sh_info = number of Verneed entries
            var strtab = span[(int)(shoff + (ulong)(link * shentsize))..];
            ulong strOffset = BinaryPrimitives.ReadUInt64LittleEndian(strtab[0x18..]);

            int vn = (int)offset;
            for (uint n = 0; n < count; n++)
            {
                ushort cnt = BinaryPrimitives.ReadUInt16LittleEndian(span[(vn + 2)..]);
                uint file = BinaryPrimitives.ReadUInt32LittleEndian(span[(vn + 4)..]);
                uint aux = BinaryPrimitives.ReadUInt32LittleEndian(span[(vn + 8)..]);
                uint next = BinaryPrimitives.ReadUInt32LittleEndian(span[(vn + 12)..]);
                string library = ReadCString(span, (int)(strOffset + file));

                int va = vn + (int)aux;
                for (int a = 0; a < cnt; a++)
                {
                    ushort flags = BinaryPrimitives.ReadUInt16LittleEndian(span[(va + 4)..]);
                    uint name = BinaryPrimitives.ReadUInt32LittleEndian(span[(va + 8)..]);
                    uint vnaNext = BinaryPrimitives.ReadUInt32LittleEndian(span[(va + 12)..]);
                    result.Add(new VersionNeed(library, ReadCString(span, (int)(strOffset + name)), (flags & VerFlgWeak) != 0, va + 4));
                    if (vnaNext == 0) break;
                    va += (int)vnaNext;
                }
                if (next == 0) break;
                vn += (int)next;
            }
        }
        return result;
    }

    /// <summary>
    /// Sets the weak flag on every version need for which <paramref name="shouldWeaken"/> answers true.
    /// Returns the versions changed (empty if the file already loads or nothing matched).
    /// </summary>
    public static IReadOnlyList<string> WeakenVersionNeeds(byte[] elf, Func<VersionNeed, bool> shouldWeaken)
    {
        var changed = new List<string>();
        foreach (var need in ReadVersionNeeds(elf))
        {
            if (need.Weak || !shouldWeaken(need)) continue;
            ushort flags = BinaryPrimitives.ReadUInt16LittleEndian(elf.AsSpan(need.FlagsOffset));
            BinaryPrimitives.WriteUInt16LittleEndian(elf.AsSpan(need.FlagsOffset), (ushort)(flags | VerFlgWeak));
            changed.Add(need.Version);
        }
        return changed;
    }

    private static string ReadCString(ReadOnlySpan<byte> span, int offset)
    {
        int end = span[offset..].IndexOf((byte)0);
        return Encoding.ASCII.GetString(span.Slice(offset, end));
    }
}
